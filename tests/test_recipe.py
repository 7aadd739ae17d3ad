"""The reference recipe's pieces: base-stage start, the teacher's own input size, separate head learning rate,
best-epoch weights, and the energy_rl loss terms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from oal import registry, stages
from oal.config import LossConfig, TeacherConfig, TrainConfig, load_config
from oal.losses import EnergyRegularizer, OALLoss
from oal.models import build_student, build_teacher
from oal.train import CHECKPOINT, Loop, OALTerms, _param_groups, fit, load_checkpoint_net
from tests.conftest import QUICK


def _data(n=48, k=3, size=8):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % k
    return TensorDataset(torch.randn(n, 3, size, size, generator=g) + y.view(-1, 1, 1, 1).float(), y)


# ---- the teacher at its own input size ---------------------------------------------------------------

def test_teacher_sees_its_own_size_whatever_the_student_trains_at():
    teacher = build_teacher(TeacherConfig(network="vit_tiny", image_size=64), 6, image_size=32)
    seen = []
    teacher.model.patch_embed.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    logits, feat = teacher(torch.randn(2, 3, 32, 32))  # the student's 32 px batch
    assert seen == [(2, 3, 64, 64)] and logits.shape == (2, 6) and feat.shape == (2, 64)
    assert teacher.model.patch_embed.grid_size == (8, 8)  # built at 64 px, 8 px patches: no resampled grid


def test_reference_teacher_gets_224_in_the_student_loop(monkeypatch, tmp_path):
    """cifar100_32: a 32 px student, and the ViT-B/16 teacher's patch embedding receives 224 px input."""
    cfg = load_config("cifar100_32", ["data.openood_root=/d", "teacher.pretrained=/w", "diffusion.model=/s"])
    from dataclasses import replace

    teacher = build_teacher(replace(cfg.teacher, pretrained=None), 100, cfg.data.image_size)  # random weights
    seen = []
    teacher.model.patch_embed.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[-2:])))
    net = build_student(cfg.model.student, 100)
    loss = OALLoss(LossConfig(w_micl_knn=0, w_micl_lat=0), net.feature_dim, teacher.feature_dim)
    x = torch.randn(4, 3, 32, 32)
    fit(net, TensorDataset(x, torch.arange(4)), TrainConfig(epochs=1, precise_bn=0), tmp_path / "run",
        Loop(batch_size=4, seed=0, device="cpu", progress=False, resume=False),
        OALTerms(loss=loss, teacher=teacher))
    assert seen == [(224, 224)]
    assert (tmp_path / "run" / CHECKPOINT).is_file()  # the run's files in the test's own folder, removed with it


# ---- the base stage and the student's start -----------------------------------------------------------

@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    cfg = load_config("digits", [*QUICK, f"output_dir={out}", "base.epochs=2", "base.precise_bn=0"])
    res = registry.run_stage("base", cfg, progress=False)
    return cfg, res


def test_oal_student_starts_from_the_base_checkpoint(base_run, monkeypatch):
    cfg, res = base_run
    assert not res.skipped and res.name == "base"
    started = {}

    def record(net, *args, **kw):
        started.update({k: v.clone() for k, v in net.state_dict().items()})
        raise SystemExit  # stop before training

    monkeypatch.setattr(stages, "fit", record)
    from dataclasses import replace

    no_teacher = replace(cfg.loss, w_logit_kd=0.0, w_feat_kd=0.0, w_micl_knn=0.0, w_micl_lat=0.0)
    with pytest.raises(SystemExit):
        registry.train_stage(replace(cfg, loss=no_teacher, student=replace(cfg.student, init="base")), "student")
    base = build_student(cfg.model.student, 6)
    load_checkpoint_net(res.outputs["checkpoint"], base)
    assert started and all(torch.equal(started[k], v) for k, v in base.state_dict().items())
    started.clear()
    with pytest.raises(SystemExit):
        registry.train_stage(replace(cfg, loss=no_teacher), "student")  # student.init=scratch
    assert not torch.equal(started["fc.weight"], base.state_dict()["fc.weight"])
    # the student's fingerprint follows the base stage's when it starts from it
    from_base = replace(cfg, student=replace(cfg.student, init="base"))
    a = registry.fingerprint("student", from_base)
    b = registry.fingerprint("student", replace(from_base, base=replace(cfg.base, lr=0.3)))
    assert a != b
    assert registry.fingerprint("student", cfg) == registry.fingerprint("student", replace(cfg, base=replace(cfg.base, lr=0.3)))


def test_base_checkpoint_of_another_network_is_one_clear_error(base_run):
    from dataclasses import replace

    cfg, res = base_run
    other_arch = replace(cfg, model=replace(cfg.model, student="resnet18_32"), student=replace(cfg.student, init="base"),
                         base=replace(cfg.base, checkpoint=res.outputs["checkpoint"]))
    with pytest.raises(ValueError, match=r"holds a resnet_tiny with 6 classes; expected model.student=resnet18_32"):
        stages.load_base(other_arch, build_student("resnet18_32", 6), 6)
    with pytest.raises(ValueError, match=r"holds a resnet_tiny with 6 classes; .* with 10 classes"):
        stages.load_base(replace(other_arch, model=replace(other_arch.model, student="resnet_tiny")),
                         build_student("resnet_tiny", 10), 10)
    with pytest.raises(FileNotFoundError, match="student.init=scratch"):
        stages.load_base(replace(cfg, output_dir="/nonexistent"), build_student("resnet_tiny", 6), 6)


# ---- best-epoch weights ----------------------------------------------------------------------------------

def test_best_epoch_weights_are_kept_and_selectable(tmp_path):
    accs = iter([0.5, 0.9, 0.7])  # epoch 2 is the best
    snapshots = {}

    def eval_fn(net):
        return {"val/id_accuracy": next(accs)}

    def keep(epoch, metrics, ckpt):
        snapshots[epoch] = {k: v.clone() for k, v in net.state_dict().items()}

    torch.manual_seed(0)
    net = build_student("resnet_tiny", 3)
    fit(net, _data(), TrainConfig(epochs=3, lr=0.05, precise_bn=0), tmp_path,
        Loop(batch_size=16, seed=0, device="cpu", progress=False),
        eval_fn=eval_fn, on_epoch_end=keep)
    best, last = build_student("resnet_tiny", 3), build_student("resnet_tiny", 3)
    assert load_checkpoint_net(tmp_path / CHECKPOINT, best, "best")["epoch"] == 2
    assert load_checkpoint_net(tmp_path / CHECKPOINT, last, "last")["epoch"] == 3
    assert all(torch.equal(v, snapshots[2][k]) for k, v in best.state_dict().items())
    assert all(torch.equal(v, snapshots[3][k]) for k, v in last.state_dict().items())
    with pytest.raises(ValueError, match="'last' or 'best'"):
        load_checkpoint_net(tmp_path / CHECKPOINT, last, "first")


# ---- optimizer groups --------------------------------------------------------------------------------------

def test_teacher_head_has_its_own_learning_rate():
    teacher = build_teacher(TeacherConfig(network="vit_tiny"), 5, 32)
    groups = _param_groups(teacher, None, TrainConfig(optimizer="adam", lr=1e-6, head_lr=1e-4))
    by_name = {g["name"]: g for g in groups}
    head = list(teacher.model.get_classifier().parameters())
    assert by_name["head"]["lr"] == 1e-4 and by_name["net"]["lr"] == 1e-6
    assert {id(p) for p in by_name["head"]["params"]} == {id(p) for p in head}
    assert len(by_name["net"]["params"]) + len(head) == len(list(teacher.parameters()))
    assert len(_param_groups(teacher, None, TrainConfig(lr=0.1))) == 1  # head_lr unset: one group


# ---- the reference's energy_rl terms ------------------------------------------------------------------------

def test_energy_regularizer_by_hand():
    reg = EnergyRegularizer(outlier_dim=2, student_dim=3)
    with torch.no_grad():
        reg.logistic.weight.copy_(torch.tensor([[-1.0], [1.0]]))  # logit(ID) - logit(outlier) = 2 * energy
        reg.logistic.bias.zero_()
    reg.dt.eval()  # BatchNorm on running statistics (0 mean, unit variance): DT(x) = relu(Wx + b) / sqrt(1 + eps)
    feat = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])  # (B=2, 3)
    out = torch.zeros(1, 2)  # (M=1, 2)
    e_id = [math.log(3.0), math.log(math.e + math.e**2 + math.e**3)]
    dt_out = reg.dt(out)[0]
    e_out = math.log(sum(math.exp(v) for v in dt_out.tolist()))
    # cross-entropy of [-e, e] with ID = class 1, outlier = class 0
    expected = (F.softplus(torch.tensor(-2 * e_id[0])) + F.softplus(torch.tensor(-2 * e_id[1]))
                + F.softplus(torch.tensor(2 * e_out))) / 3
    assert reg(feat, out).item() == pytest.approx(expected.item(), rel=1e-5)


def test_energy_terms_raise_id_energy_and_lower_outlier_energy():
    torch.manual_seed(0)
    reg = EnergyRegularizer(outlier_dim=4, student_dim=8)
    with torch.no_grad():  # start where the regression says "higher energy = more ID"
        reg.logistic.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        reg.logistic.bias.zero_()
    feat = torch.randn(16, 8, requires_grad=True)
    outliers = torch.randn(16, 4)
    reg(feat, outliers).backward()
    e_id_before = torch.logsumexp(feat, -1)
    stepped = feat - 0.5 * feat.grad  # a gradient step on the ID features
    assert (torch.logsumexp(stepped, -1) > e_id_before).all()  # each ID sample's energy goes up
    # the projected outliers' energy goes down under a step on the projector's last layer
    reg.zero_grad()
    loss = reg(feat.detach(), outliers)
    loss.backward()
    with torch.no_grad():
        before = torch.logsumexp(reg.dt(outliers), -1).mean()
        for p in reg.dt.parameters():
            p -= 0.1 * p.grad
        assert torch.logsumexp(reg.dt(outliers), -1).mean() < before


def test_energy_weights_in_the_total_and_need_their_outliers():
    cfg = LossConfig(w_logit_kd=0, w_feat_kd=0, w_micl_knn=0, w_micl_lat=0, w_energy_knn=2.5, w_energy_lat=2.5)
    loss = OALLoss(cfg, student_dim=8, knn_dim=6, latent_dim=4)
    assert loss.energy_knn is not None and loss.energy_lat is not None and loss.club_knn is None
    logits, feat, y = torch.randn(5, 3), torch.randn(5, 8), torch.arange(5) % 3
    out = loss(logits, feat, y, knn=torch.randn(5, 6), latent=torch.randn(5, 4))
    t = out.terms
    assert out.total.item() == pytest.approx((t["ce"] + 2.5 * t["energy_knn"] + 2.5 * t["energy_lat"]).item())
    with pytest.raises(ValueError, match="loss.w_energy_lat > 0 needs outliers.latent_path"):
        OALLoss(cfg, student_dim=8, knn_dim=6)
    groups = {g["name"] for g in _param_groups(build_student("resnet_tiny", 3), loss, TrainConfig())}
    assert "energy" in groups


def test_tune_trials_and_baseline_share_the_search_base_and_teacher(tmp_path):
    from jobs.tune import baseline_config, trial_config

    cfg = load_config("digits", [f"output_dir={tmp_path}", "student.init=base"])
    shared_base = str(tmp_path / "digits" / "base" / CHECKPOINT)
    for run in (trial_config(cfg, {w: 0.3 for w in cfg.search.weights}, "t1"), baseline_config(cfg)):
        assert run.name != cfg.name  # its own run folder...
        assert run.base.checkpoint == shared_base  # ...but the search's base student and teacher
        assert run.teacher.checkpoint == str(tmp_path / "digits" / "teacher" / CHECKPOINT)
        assert not stages.needs_base(run)  # no second base training inside a trial
