import pytest
import torch

from oal.config import TeacherConfig
from oal.models import STUDENTS, TEACHERS, build_student, build_teacher, classifier_head, load_backbone


@pytest.mark.parametrize("name,size,dim", [("resnet18_32", 32, 512), ("resnet18_224", 64, 512), ("resnet_tiny", 32, 64)])
def test_students(name, size, dim):
    assert name in STUDENTS
    net = build_student(name, 7).eval()
    logits, feat = net(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 7) and feat.shape == (2, dim) and net.feature_dim == dim


@pytest.mark.parametrize("name,size,dim", [("vit_tiny", 32, 64), ("resnet_tiny", 32, 64), ("vit_b16", 32, 768)])
def test_teachers(name, size, dim):
    assert name in TEACHERS
    net = build_teacher(TeacherConfig(network=name), 5, size).eval()
    logits, feat = net(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 5) and feat.shape == (2, dim) and net.feature_dim == dim
    # the logits are the classifier head applied to the features we return, for every kind of teacher
    head = classifier_head(net)
    assert isinstance(head, torch.nn.Linear) and (head.in_features, head.out_features) == (dim, 5)
    assert torch.allclose(head(feat), logits, atol=1e-5)
    assert not torch.allclose(feat[0], feat[1])  # features of the input, not a constant
    if name.startswith("vit"):
        assert net.model.get_classifier() is head  # timm's own head, not a copy
    else:
        assert head is net.fc


def test_unknown_names():
    with pytest.raises(ValueError, match="model.student"):
        build_student("resnet50", 3)
    with pytest.raises(ValueError, match="teacher.network"):
        build_teacher(TeacherConfig(network="clip"), 3, 32)


def test_teacher_pretrained_file(tmp_path):
    src = build_teacher(TeacherConfig(network="vit_tiny"), 3, 32)
    path = tmp_path / "backbone.pt"
    torch.save(src.model.state_dict(), path)
    dst = build_teacher(TeacherConfig(network="vit_tiny", pretrained=str(path)), 9, 32)
    assert torch.equal(dst.model.blocks[0].attn.qkv.weight, src.model.blocks[0].attn.qkv.weight)
    assert dst.model.head.out_features == 9  # the head is not taken from the file
    with pytest.raises(FileNotFoundError, match="teacher.pretrained"):
        load_backbone(dst.model, str(tmp_path / "none.pt"))
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="wrong.pt"):
        load_backbone(dst.model, str(tmp_path / "wrong.pt"))
