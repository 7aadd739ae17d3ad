"""The two loss terms beyond the paper (issue 13): VOS-style logit energy and pixel outlier exposure. Values on fixed
tensors against hand computation, the direction their gradients move the energy score EBO reads, their wiring into
the OAL loss and the student stage, and the errors for a pixel OE config that cannot work."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import oal.synthesize as S
from oal.config import ConfigError, DiffusionConfig, LossConfig, TrainConfig, load_config
from oal.data import build_benchmark
from oal.losses import LogitEnergyRegularizer, OALLoss, oe_loss
from oal.models import build_student
from oal.train import _param_groups, load_pixel_outliers
from tests.conftest import QUICK

EPS = 1e-5  # BatchNorm's


def _fixed_regularizer() -> tuple[LogitEnergyRegularizer, nn.Linear]:
    """Projector in eval mode with zero weights: DT(o) = relu(b) / sqrt(1 + eps) for every outlier o. Head maps
    student features (3) to 2 logits: [f0, f2]."""
    reg = LogitEnergyRegularizer(outlier_dim=2, student_dim=3)
    lin = reg.dt.net[1]
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([1.0, -5.0, 2.0]))
    reg.dt.eval()
    head = nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
        head.bias.zero_()
    return reg, head


def test_logit_energy_by_hand():
    reg, head = _fixed_regularizer()
    id_logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    outliers = torch.randn(1, 2)  # any: the projector's weights are zero
    s_id = [math.log(2.0), 1.0 + math.log(2.0)]  # logsumexp of each ID row
    c = 1 / math.sqrt(1 + EPS)  # the projector's final BatchNorm on running stats 0 / 1
    s_out = math.log(math.exp(1.0 * c) + math.exp(2.0 * c))  # head(DT(o)) = [1, 2] (times c)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    # slope 1, bias 0 at the start: BCE with label 1 for ID is softplus(-s), label 0 for the outlier softplus(s)
    expected = (softplus(-s_id[0]) + softplus(-s_id[1]) + softplus(s_out)) / 3
    assert reg(id_logits, outliers, head).item() == pytest.approx(expected, rel=1e-6)
    # a different slope and bias enter as softplus(a) * s + b
    with torch.no_grad():
        reg.raw_slope.fill_(0.0)  # softplus(0) = log 2
        reg.bias.fill_(-1.0)
    a = math.log(2.0)
    expected = (softplus(-(a * s_id[0] - 1)) + softplus(-(a * s_id[1] - 1)) + softplus(a * s_out - 1)) / 3
    assert reg(id_logits, outliers, head).item() == pytest.approx(expected, rel=1e-6)


def test_logit_energy_raises_id_scores_and_lowers_outlier_scores():
    torch.manual_seed(0)
    reg = LogitEnergyRegularizer(outlier_dim=4, student_dim=8)
    head = nn.Linear(8, 5)
    id_logits = torch.randn(16, 5, requires_grad=True)
    outliers = torch.randn(16, 4)
    reg(id_logits, outliers, head).backward()
    stepped = id_logits - 0.5 * id_logits.grad
    assert (torch.logsumexp(stepped, -1) > torch.logsumexp(id_logits, -1)).all()  # every ID sample's score rises
    # a step on the projector and the head lowers the outliers' scores
    reg.zero_grad()
    head.zero_grad()
    reg(id_logits.detach(), outliers, head).backward()
    with torch.no_grad():
        before = torch.logsumexp(head(reg.dt(outliers)), -1)
        for p in [*reg.dt.parameters(), *head.parameters()]:
            p -= 0.05 * p.grad
        after = torch.logsumexp(head(reg.dt(outliers)), -1)
    assert after.mean() < before.mean()
    # the slope stays positive whatever its parameter: the direction cannot flip during training
    with torch.no_grad():
        reg.raw_slope.fill_(-30.0)
    assert reg.logistic(torch.tensor([1.0])) > reg.logistic(torch.tensor([0.0]))


def test_oe_by_hand_and_its_direction():
    logits = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], requires_grad=True)
    expected = (math.log(3.0) + (math.log(math.e**2 + 2) - 2 / 3)) / 2  # CE to uniform = lse - mean, per row
    out = oe_loss(logits)
    assert out.item() == pytest.approx(expected, rel=1e-6)
    out.backward()
    assert torch.allclose(logits.grad[0], torch.zeros(3), atol=1e-7)  # already uniform: no push
    p = torch.softmax(logits.detach()[1], -1)
    assert torch.allclose(logits.grad[1], (p - 1 / 3) / 2)  # d/dl (lse - mean) = softmax - 1/K, batch mean
    stepped = logits.detach() - 1.0 * logits.grad
    assert torch.logsumexp(stepped[1], -1) < torch.logsumexp(logits.detach()[1], -1)  # the outlier's score drops
    assert torch.softmax(stepped[1], -1).max() < p.max()  # and its top softmax probability (MSP) too


def test_new_terms_in_the_total_and_their_errors():
    cfg = LossConfig(w_logit_kd=0, w_feat_kd=0, w_micl_knn=0, w_micl_lat=0, w_logit_energy_knn=0.1,
                     w_logit_energy_lat=0.3, w_pixel_oe=0.5)
    loss = OALLoss(cfg, student_dim=8, knn_dim=6, latent_dim=4)
    head = nn.Linear(8, 3)
    feat = torch.randn(5, 8)
    logits, y = head(feat), torch.arange(5) % 3
    out = loss(logits, feat, y, knn=torch.randn(5, 6), latent=torch.randn(5, 4), head=head,
               pixel_logits=torch.randn(4, 3))
    t = out.terms
    assert set(t) == {"ce", "logit_energy_knn", "logit_energy_lat", "pixel_oe"}
    expected = t["ce"] + 0.1 * t["logit_energy_knn"] + 0.3 * t["logit_energy_lat"] + 0.5 * t["pixel_oe"]
    assert out.total.item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="student's classifier head"):
        loss(logits, feat, y, knn=torch.randn(5, 6), latent=torch.randn(5, 4))
    with pytest.raises(ValueError, match="loss.w_logit_energy_lat > 0 needs outliers.latent_path"):
        OALLoss(cfg, student_dim=8, knn_dim=6)
    # their projectors and regressions are trained, at the DT projector's learning rate
    groups = {g["name"]: g for g in _param_groups(build_student("resnet_tiny", 3), loss, TrainConfig())}
    ids = {id(p) for p in groups["energy"]["params"]}
    assert all(id(p) in ids for p in loss.parameters()) and groups["energy"]["lr"] == TrainConfig().dt_lr


def test_pixel_oe_without_decoded_outliers_is_one_config_error():
    with pytest.raises(ConfigError, match="'loss.w_pixel_oe' needs decoded outliers.*diffusion.mode=pixel"):
        load_config("digits", ["loss.w_pixel_oe=0.5"])
    with pytest.raises(ConfigError, match="'loss.w_pixel_oe' needs decoded outliers"):
        load_config("digits", ["search.weights=[w_pixel_oe]"])  # a search that may switch it on
    assert load_config("digits", ["loss.w_pixel_oe=0.5", "diffusion.mode=pixel"]).loss.uses_pixel
    assert load_config("digits", ["loss.w_pixel_oe=0.5", "outliers.pixel_path=/x.pt"]).loss.uses_pixel


def test_pixel_outlier_files_are_resized_or_refused(tmp_path):
    f = tmp_path / "px.pt"
    torch.save({"images": torch.full((4, 3, 16, 16), 200, dtype=torch.uint8)}, f)
    x = load_pixel_outliers(str(f), 32)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 and (x == 200).all()  # bilinear keeps a flat image
    torch.save({"images": torch.rand(2, 3, 8, 8)}, f)  # floats in [0, 1] are taken as 8-bit
    assert load_pixel_outliers(str(f), 8).dtype == torch.uint8
    for bad, what in ((torch.zeros(2, 1, 16, 16, dtype=torch.uint8), r"\(2, 1, 16, 16\)"),
                      (torch.zeros(2, 3, 16, 12, dtype=torch.uint8), r"\(2, 3, 16, 12\)"),
                      (torch.zeros(3, 16, 16, dtype=torch.uint8), r"\(3, 16, 16\)")):
        torch.save({"images": bad}, f)
        with pytest.raises(ValueError, match=f"{what}.*expected \\[N, 3, S, S\\]"):
            load_pixel_outliers(str(f), 32)
    torch.save({"images": torch.full((2, 3, 8, 8), 2.0)}, f)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        load_pixel_outliers(str(f), 8)
    torch.save({"vectors": torch.zeros(2, 8)}, f)
    with pytest.raises(ValueError, match="diffusion.mode=pixel"):
        load_pixel_outliers(str(f), 8)


def test_pixel_mode_writes_every_outlier_decoded(tmp_path):
    cfg = DiffusionConfig(steps=2, num_outliers=5, shard_size=3, batch_size=3, mode="pixel")
    m = S.synthesize(cfg, ["a", "b"], torch.randn(2, 4, 32), tmp_path, seed=0, progress=False)
    assert m["images_file"] == S.IMAGES and m["image_shape"] == [3, 16, 16]
    images = torch.load(tmp_path / S.IMAGES, weights_only=False)["images"]
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.uint8 and images.float().std() > 0
    lat = S.finalize(DiffusionConfig(steps=2, num_outliers=5, shard_size=3), S.plan_shards(5, 3, 0), tmp_path, 0,
                     "m", "fp")
    assert lat["images_file"] is None  # latent mode lists no images file


def test_student_trains_with_both_terms_on_decoded_outliers(tmp_path):
    """The student stage end to end with logit energy on both outlier sets and pixel OE on 16 px decoded outliers
    (resized to the digits preset's side): every term reported, and each term changes the result by itself."""
    from oal import registry

    torch.save({"outliers": torch.randn(40, 12)}, tmp_path / "knn.pt")
    torch.save({"outliers": torch.randn(40, 8)}, tmp_path / "lat.pt")
    torch.save({"images": torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)}, tmp_path / "px.pt")
    common = [*QUICK, f"output_dir={tmp_path}", "loss.w_logit_kd=0", "loss.w_feat_kd=0", "loss.w_micl_knn=0",
              "loss.w_micl_lat=0", "student.init=scratch", "student.epochs=1", "student.precise_bn=0",
              f"outliers.knn_path={tmp_path / 'knn.pt'}", f"outliers.latent_path={tmp_path / 'lat.pt'}"]
    cfg = load_config("digits", [*common, "name=on", "loss.w_logit_energy_knn=0.1", "loss.w_logit_energy_lat=0.1",
                                 "loss.w_pixel_oe=0.5", f"outliers.pixel_path={tmp_path / 'px.pt'}"])
    res = registry.train_stage(cfg, "student", progress=False)
    h = res.history[0]
    assert {"loss/logit_energy_knn", "loss/logit_energy_lat", "loss/pixel_oe"} <= set(h)
    k = len(build_benchmark(cfg.data).class_names)
    assert math.log(k) - 1e-4 <= h["loss/pixel_oe"] < 3 * math.log(k)  # lse - mean >= log K, equal when uniform
    # each term changes the training by itself: the same run (same batches, same outlier draws) with only the pixel
    # OE weight changed, then with only the logit-energy weights changed (a term left out would change nothing;
    # leaving a term out altogether would also change the outlier draws, which follow one stream)
    px = registry.train_stage(load_config("digits", [*common, "name=px", "loss.w_logit_energy_knn=0.1",
                                                   "loss.w_logit_energy_lat=0.1", "loss.w_pixel_oe=2.0",
                                                   f"outliers.pixel_path={tmp_path / 'px.pt'}"]), "student",
                            progress=False).history[0]
    le = registry.train_stage(load_config("digits", [*common, "name=le", "loss.w_logit_energy_knn=0.5",
                                                   "loss.w_logit_energy_lat=0.5", "loss.w_pixel_oe=0.5",
                                                   f"outliers.pixel_path={tmp_path / 'px.pt'}"]), "student",
                            progress=False).history[0]
    assert set(px) == set(le) == set(h)
    assert px["loss/ce"] != h["loss/ce"] and px["loss/pixel_oe"] != h["loss/pixel_oe"]
    assert le["loss/ce"] != h["loss/ce"] and le["loss/logit_energy_knn"] != h["loss/logit_energy_knn"]
    assert le["loss/ce"] != px["loss/ce"]
