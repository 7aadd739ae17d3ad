import pytest
import torch
from torch.utils.data import TensorDataset

from oal.config import LossConfig, TrainConfig
from oal.losses import OALLoss
from oal.models import build_student
from oal.train import CHECKPOINT, Loop, NonFiniteLossError, OALTerms, fit, load_checkpoint_net, load_outliers


def _data(n=48, k=3, size=8):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % k
    x = torch.randn(n, 3, size, size, generator=g) + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


def _run(out, epochs, resume=True, outliers=True, **kw):
    torch.manual_seed(123)
    net = build_student("resnet_tiny", 3)
    loss = OALLoss(LossConfig(w_logit_kd=0, w_feat_kd=0, w_micl_lat=0, outlier_batch_size=8), net.feature_dim,
                   knn_dim=5) if outliers else None
    knn = torch.randn(40, 5, generator=torch.Generator().manual_seed(9)) if outliers else None
    cfg = TrainConfig(epochs=epochs, lr=0.05, **kw)
    res = fit(net, _data(), cfg, out,
              Loop(batch_size=16, seed=7, device="cpu", resume=resume, progress=False),
              OALTerms(loss=loss, knn=knn, batch_size=8))
    return net, loss, res


def test_interrupted_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    full, full_loss, full_res = _run(tmp_path / "full", epochs=3)

    class Stop(Exception):
        pass

    def stop_after_2(epoch, metrics, ckpt):
        if epoch == 2:
            raise Stop

    torch.manual_seed(123)
    net = build_student("resnet_tiny", 3)
    loss = OALLoss(LossConfig(w_logit_kd=0, w_feat_kd=0, w_micl_lat=0, outlier_batch_size=8), net.feature_dim,
                   knn_dim=5)
    knn = torch.randn(40, 5, generator=torch.Generator().manual_seed(9))
    with pytest.raises(Stop):
        fit(net, _data(), TrainConfig(epochs=3, lr=0.05), tmp_path / "cut",
            Loop(batch_size=16, seed=7, device="cpu", progress=False),
            OALTerms(loss=loss, knn=knn, batch_size=8),
            on_epoch_end=stop_after_2)
    ck = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    assert ck["epoch"] == 2 and {"modules", "optimizer", "scheduler", "rng", "meta"} <= set(ck)
    # a fresh process would rebuild everything from scratch (other random init) and resume
    torch.manual_seed(999)
    resumed, resumed_loss, res = _run(tmp_path / "cut", epochs=3)
    assert res.resumed_from_epoch == 2
    # the history spans the whole run: the epochs before the cut come back from the checkpoint
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    for a, b in zip(res.history, full_res.history):
        assert a["loss/total"] == pytest.approx(b["loss/total"], rel=1e-6)
    assert res.history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # the cosine schedule ran to its end
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full_loss.state_dict().values(), resumed_loss.state_dict().values()):
        assert torch.equal(a, b)


def test_training_learns(tmp_path):
    _, _, res = _run(tmp_path, epochs=4, outliers=False)
    assert res.history[-1]["loss/ce"] < 0.5 * res.history[0]["loss/ce"]


def test_nonfinite_loss_names_term_and_keeps_checkpoint(tmp_path):
    _run(tmp_path, epochs=1)
    before = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    net = build_student("resnet_tiny", 3)
    loss = OALLoss(LossConfig(w_logit_kd=0, w_feat_kd=0, w_micl_lat=0), net.feature_dim, knn_dim=5)
    bad = torch.randn(40, 5)
    bad[:] = 1e30  # finite input that overflows q's variance net into inf/nan
    with torch.no_grad():
        loss.club_knn.mu[0].weight.fill_(1e30)
    with pytest.raises(NonFiniteLossError, match="micl_knn.*Last good checkpoint"):
        fit(net, _data(), TrainConfig(epochs=3), tmp_path,
            Loop(batch_size=16, seed=7, device="cpu", resume=False, progress=False),
            OALTerms(loss=loss, knn=bad))
    after = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert after["epoch"] == before["epoch"] == 1
    for a, b in zip(before["modules"].values(), after["modules"].values()):
        assert torch.equal(a, b)


def test_outlier_file_validation(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"outliers": torch.randn(2, 4, 3)}, good)
    assert load_outliers(str(good), "k-NN outlier").shape == (8, 3)
    torch.save(torch.randn(5), tmp_path / "flat.pt")
    with pytest.raises(ValueError, match="flat.pt.*expected \\[N, D\\]"):
        load_outliers(str(tmp_path / "flat.pt"), "k-NN outlier")
    x = torch.randn(6, 3)
    x[2, 1] = float("nan")
    torch.save(x, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="nan.pt.*1 rows with NaN"):
        load_outliers(str(tmp_path / "nan.pt"), "latent outlier")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt.*corrupt"):
        load_outliers(str(tmp_path / "junk.pt"), "latent outlier")
    with pytest.raises(FileNotFoundError, match="none.pt"):
        load_outliers(str(tmp_path / "none.pt"), "latent outlier")


def test_mismatched_checkpoint(tmp_path):
    _run(tmp_path, epochs=1, outliers=False)
    with pytest.raises(ValueError, match="does not fit the network"):
        load_checkpoint_net(tmp_path / CHECKPOINT, build_student("resnet18_32", 3))
    # resuming with another loss configuration is refused with the file named
    net = build_student("resnet_tiny", 3)
    loss = OALLoss(LossConfig(w_logit_kd=0, w_feat_kd=0, w_micl_lat=0), net.feature_dim, knn_dim=5)
    with pytest.raises(ValueError, match="checkpoint.pt.*does not match"):
        fit(net, _data(), TrainConfig(epochs=2), tmp_path,
            Loop(batch_size=16, seed=7, device="cpu", progress=False),
            OALTerms(loss=loss, knn=torch.randn(10, 5)))


def test_train_stage_does_not_depend_on_the_process_seed(tmp_path):
    """Ray workers start with a random torch seed: the stage must seed its network and loss nets itself."""
    from oal import registry
    from oal.config import load_config

    cfg = load_config("digits", ["student.epochs=1", "loss.w_logit_kd=0", "loss.w_feat_kd=0", "loss.w_micl_knn=0",
                                 "loss.w_micl_lat=0", "device=cpu", f"output_dir={tmp_path}"])
    weights = []
    for process_seed in (1, 2):
        torch.manual_seed(process_seed)
        res = registry.train_stage(cfg, "student", out_dir=tmp_path / f"s{process_seed}", progress=False)
        weights.append(torch.load(res.checkpoint, weights_only=True)["modules"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


class _Augmented(torch.utils.data.Dataset):
    """`_data()` with noise drawn from the global RNG on every read, as random-crop/flip augmentation does."""

    def __init__(self, scale: float):
        self.base, self.scale = _data(), scale

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + self.scale * torch.randn_like(x), y


def _fit_plain(out, data, precise_bn):
    torch.manual_seed(123)
    net = build_student("resnet_tiny", 3)
    fit(net, data, TrainConfig(epochs=3, lr=0.05, precise_bn=precise_bn), out,
        Loop(batch_size=16, seed=7, device="cpu", resume=False, progress=False))
    return net


def test_precise_bn_changes_only_batchnorm_statistics(tmp_path):
    """PreciseBN leaves the training itself alone (same weights, even with augmentation that draws from the
    global RNG: its pass must not move that stream), and its statistics are those of the final weights on the
    training images, not the momentum average."""
    on = _fit_plain(tmp_path / "on", _Augmented(0.1), precise_bn=48)
    off = _fit_plain(tmp_path / "off", _Augmented(0.1), precise_bn=0)
    for (k, a), b in zip(on.named_parameters(), off.parameters()):
        assert torch.equal(a, b), k
    exact_net = _fit_plain(tmp_path / "exact", _data(), precise_bn=48)
    # The stem's BatchNorm sees the stem convolution's output: its exact per-channel mean over all 48 images
    # (3 batches of 16, equal sizes, so the cumulative average of batch means is the mean).
    bn = exact_net.stem[1]
    x = torch.stack([img for img, _ in _data()])
    with torch.no_grad():
        exact = exact_net.stem[0](x).mean(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean, exact, atol=1e-5)
    lagging = _fit_plain(tmp_path / "lagging", _data(), precise_bn=0).stem[1].running_mean
    assert (lagging - exact).abs().max() > 10 * (bn.running_mean - exact).abs().max()


def test_precise_bn_skips_networks_without_batchnorm():
    from accelerate import Accelerator

    from oal.train import recompute_bn_stats

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3), torch.nn.LayerNorm(3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert not recompute_bn_stats(net, _data(), 48, 16, Accelerator(cpu=True), seed=0)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("n", [48, 49, 50, 51])  # last batch of 16, 1, 2, 3 images
def test_every_shape_of_last_batch_trains_with_batchnorm_everywhere(tmp_path, n):
    # The student (BatchNorm down to 1x1 maps), the DT projector (BatchNorm1d) and PreciseBN all see the last
    # batch; one image in it used to fail at the end of the epoch with "Expected more than 1 value per channel".
    from oal.train import single_last_batch

    torch.manual_seed(0)
    net, teacher = build_student("resnet_tiny", 3), build_student("resnet_tiny", 3)
    loss = OALLoss(LossConfig(w_micl_knn=0, w_micl_lat=0), net.feature_dim, teacher.feature_dim)
    assert loss.dt is not None and any(isinstance(m, torch.nn.BatchNorm1d) for m in loss.dt.modules())
    res = fit(net, _data(n=n), TrainConfig(epochs=1, precise_bn=n), tmp_path,
              Loop(batch_size=16, seed=0, device="cpu", progress=False),
              OALTerms(loss=loss, teacher=teacher))
    assert res.history[-1]["epoch"] == 1 and torch.isfinite(torch.tensor(res.history[-1]["loss/total"]))
    assert single_last_batch(n, 16) == (n == 49)
    assert [single_last_batch(k, 8) for k in (1, 8, 9, 17, 18)] == [False, False, True, True, False]


def test_bf16_teacher_copy_gives_fp32_targets_close_to_the_fp32_teacher():
    from oal.train import frozen_teacher, make_accelerator, teacher_targets

    torch.manual_seed(0)
    x = _data(n=8).tensors[0]
    cfg32, cfg16 = TrainConfig(teacher_dtype="fp32"), TrainConfig(teacher_dtype="bf16")
    acc = make_accelerator("cpu", cfg32)
    assert acc.mixed_precision == "no"  # mixed_precision=auto on a CPU: none
    base = build_student("resnet_tiny", 3)
    t32 = frozen_teacher(build_student("resnet_tiny", 3).requires_grad_(True), acc, cfg32)
    t32.load_state_dict(base.state_dict())
    t16 = frozen_teacher(build_student("resnet_tiny", 3), acc, cfg16)
    t16.load_state_dict(base.state_dict())
    assert next(t16.parameters()).dtype == torch.bfloat16 and not any(p.requires_grad for p in t32.parameters())
    l32, f32 = teacher_targets(t32, x, acc)
    l16, f16 = teacher_targets(t16, x, acc)
    assert l16.dtype == f16.dtype == torch.float32 and l16.shape == (8, 3) and f16.shape == f32.shape
    assert not torch.equal(l16, l32)  # it did run in bf16 ...
    assert torch.allclose(l16, l32, rtol=0.05, atol=0.05) and torch.allclose(f16, f32, rtol=0.05, atol=0.05)
    assert (l16.argmax(1) == l32.argmax(1)).float().mean() >= 0.75  # ... and kept its answers
