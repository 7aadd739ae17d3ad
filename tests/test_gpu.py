"""The CUDA code paths (marker `gpu`): bf16 autocast, channels-last, the bf16 frozen teacher, pinned-memory
evaluation, faiss on the GPU and `cluster.use_gpu` into the in-process training a Ray Train worker runs. Skipped,
with the reason, where no CUDA device is visible; `pytest -m gpu` on a GPU machine runs them (see
docs/benchmarks.md, "Mutation testing", for how they were run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from oal.config import KNNConfig, LDMConfig, LossConfig, TrainConfig, load_config
from oal.losses import OALLoss
from oal.models import build_student
from tests.conftest import QUICK

CUDA = torch.cuda.is_available()

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not CUDA, reason="needs a CUDA device: torch.cuda.is_available() is False here")]


def _faiss_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state (device, mixed precision) from the first Accelerator on: a CPU
    test's `cpu=True, mixed_precision="no"` would pin these tests to the CPU, and a GPU state would make the next
    CPU test's Accelerator fail. Each GPU test starts and ends with none."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _data(n=40, k=3, size=16):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % k
    return TensorDataset(torch.randn(n, 3, size, size, generator=g) + y.view(-1, 1, 1, 1).float(), y)


def test_auto_is_bf16_autocast_and_channels_last_on_the_gpu():
    from oal.train import channels_last, make_accelerator, resolve_device, resolve_precision, to_device

    assert resolve_device("auto") == "cuda"
    bf16 = torch.cuda.is_bf16_supported()
    assert resolve_precision("auto", "cuda") == ("bf16" if bf16 else "no")
    cfg = TrainConfig()
    acc = make_accelerator("auto", cfg)
    assert acc.device.type == "cuda" and acc.mixed_precision == ("bf16" if bf16 else "no")
    lin = torch.nn.Linear(8, 4).to(acc.device)
    with acc.autocast():
        out = lin(torch.randn(2, 8, device=acc.device))
    assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)  # autocast runs the matmul in bf16
    assert channels_last(acc, cfg) and not channels_last(acc, TrainConfig(channels_last=False))
    x = to_device(torch.randn(2, 3, 8, 8), acc, last=True)
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y = to_device(torch.arange(4), acc, last=True)  # labels: no layout to change
    assert y.is_cuda and y.dim() == 1


def test_place_and_the_bf16_frozen_teacher():
    from oal.train import frozen_teacher, make_accelerator, place, teacher_targets

    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = TrainConfig()
    acc = make_accelerator("cuda", cfg)
    torch.manual_seed(0)
    net = build_student("resnet_tiny", 3)
    teacher = build_student("resnet_tiny", 3)
    ref = build_student("resnet_tiny", 3)
    ref.load_state_dict(teacher.state_dict())
    model, opt, t, last = place(net, torch.optim.SGD(net.parameters(), lr=0.1), teacher, acc, cfg)
    assert last and next(model.parameters()).is_cuda
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # the teacher: a bf16 copy of the weights, frozen, in eval mode, channels-last
    assert next(t.parameters()).dtype == torch.bfloat16 and not any(p.requires_grad for p in t.parameters())
    assert not t.training
    x = torch.randn(4, 3, 16, 16)
    logits, feat = teacher_targets(t, x.to(acc.device).contiguous(memory_format=torch.channels_last), acc)
    assert logits.dtype == feat.dtype == torch.float32  # fp32 targets whatever the copy's dtype
    with torch.no_grad():
        ref_logits, ref_feat = ref.eval()(x)
    assert torch.allclose(logits.cpu(), ref_logits, atol=0.1, rtol=0.05)  # bf16 rounding only
    fp32 = frozen_teacher(build_student("resnet_tiny", 3), acc, TrainConfig(teacher_dtype="fp32"))
    assert next(fp32.parameters()).dtype == torch.float32


def test_fit_on_the_gpu_with_kd_in_bf16(tmp_path):
    from oal.train import Loop, OALTerms, fit, load_checkpoint_net

    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    torch.manual_seed(0)
    net, teacher = build_student("resnet_tiny", 3), build_student("resnet_tiny", 3)
    loss = OALLoss(LossConfig(w_micl_knn=0, w_micl_lat=0), net.feature_dim, teacher.feature_dim)
    res = fit(net, _data(), TrainConfig(epochs=2, precise_bn=16), tmp_path,
              Loop(batch_size=8, seed=0, device="cuda", progress=False),
              OALTerms(loss=loss, teacher=teacher))
    assert [h["epoch"] for h in res.history] == [1, 2]
    last = res.history[-1]
    assert {"loss/ce", "loss/logit_kd", "loss/feat_kd"} <= set(last)
    assert all(np.isfinite(v) for v in last.values())
    assert res.history[-1]["loss/ce"] < res.history[0]["loss/ce"] + 0.5  # it trains, not diverges
    # the checkpoint loads on a CPU-only reader, in fp32, in the standard layout's values
    cpu_net = build_student("resnet_tiny", 3)
    meta = load_checkpoint_net(res.checkpoint, cpu_net)
    assert meta["epoch"] == 2 and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in cpu_net.parameters())
    x = _data().tensors[0][:8]
    with torch.no_grad():
        a = cpu_net.eval()(x)[0]
        b = net.eval().cuda()(x.cuda())[0].float().cpu()
    assert torch.allclose(a, b, atol=2e-2, rtol=2e-2)  # cuDNN may run convolutions in TF32


def test_collect_on_the_gpu_matches_the_cpu():
    from oal.evaluate import collect

    torch.manual_seed(0)
    net = build_student("resnet_tiny", 3).eval()
    ds = _data(n=24)
    cpu = collect(net, ds, 8, "cpu")
    gpu = collect(net, ds, 8, "cuda", num_workers=2)  # pinned memory, non-blocking copies
    assert gpu.logits.device.type == "cpu" and gpu.logits.dtype == torch.float32
    assert torch.equal(gpu.labels, cpu.labels)
    assert torch.allclose(gpu.logits, cpu.logits, atol=1e-3) and torch.allclose(gpu.features, cpu.features, atol=1e-3)


@pytest.mark.skipif(not CUDA or not _faiss_gpu(), reason="faiss has no GPU support here (faiss-cpu, or no GPU)")
def test_faiss_on_the_gpu_gives_the_cpu_index_results():
    from oal.knn import _index, kth_distance, sample_outliers

    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(300, 16, generator=g), dim=-1).numpy()
    q = F.normalize(torch.randn(50, 16, generator=g), dim=-1).numpy()
    gpu, cpu = _index(x, use_gpu=True), _index(x, use_gpu=False)
    assert "Gpu" in type(gpu).__name__ and "Gpu" not in type(cpu).__name__
    for k in (1, 5, 20):
        assert np.allclose(kth_distance(gpu, q, k), kth_distance(cpu, q, k), atol=1e-4), k
    data = torch.randn(2, 60, 16, generator=g)
    cfg = dict(k=5, select=5, rounds=2, pic_nums=2, candidates=20, keep_per_point=2, sigma=0.1)
    on, off = (sample_outliers(data, KNNConfig(**cfg, use_gpu=u), seed=0) for u in (True, False))
    assert on.shape == off.shape == (2, 8, 16)
    assert torch.allclose(on, off, atol=1e-4)  # the same boundary points and candidates


def test_faiss_without_gpu_support_falls_back_to_the_cpu():
    from oal.knn import _index

    index = _index(np.eye(4, dtype=np.float32), use_gpu=True)
    assert index.ntotal == 4
    if not _faiss_gpu():
        assert "Gpu" not in type(index).__name__


def test_cluster_use_gpu_trains_in_process_on_the_gpu(tmp_path):
    """What a Ray Train worker runs with cluster.use_gpu=true (jobs.train.train_loop): an Accelerator on "cuda",
    then the stage's own training loop, in this process."""
    from oal import registry, stages
    from oal.train import make_accelerator

    cfg = load_config("digits", [*QUICK, f"output_dir={tmp_path}", "cluster.use_gpu=true", "base.epochs=1",
                                 "base.precise_bn=0"])
    assert cfg.cluster.use_gpu
    acc = make_accelerator(cfg.device if not cfg.cluster.use_gpu else "cuda", stages.training_config(cfg, "base"))
    assert acc.device.type == "cuda"
    res = registry.train_stage(cfg, "base", out_dir=tmp_path / "work", accelerator=acc, progress=False)
    assert len(res.history) == 1 and np.isfinite(res.history[0]["loss/ce"])
    assert "val/id_accuracy" in res.history[0]
    assert res.checkpoint.is_file() and res.checkpoint.parent == tmp_path / "work"


@pytest.mark.xfail(raises=ValueError, strict=False,
                   reason="accelerate's AcceleratorState is process-wide: after a bf16 stage (auto on a GPU), a stage "
                          "whose mixed_precision is 'no' (ldm.mixed_precision's default) cannot make its "
                          "Accelerator in the same process (`oal pipeline` on a GPU); reported in issue 31")
def test_stages_of_different_precision_in_one_process():
    from oal.train import make_accelerator

    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    first = make_accelerator("cuda", TrainConfig())  # teacher/base/student: auto -> bf16
    assert first.mixed_precision == "bf16"
    second = make_accelerator("cuda", LDMConfig())  # the diffusion stage: "no"
    assert second.mixed_precision == "no"


def test_every_loss_term_on_the_gpu():
    """All nine OAL terms on CUDA tensors (labels made on the inputs' device), finite and backpropagating."""
    dev = torch.device("cuda")
    w = dict(w_logit_kd=0.3, w_feat_kd=0.7, w_micl_knn=0.11, w_micl_lat=0.13, w_energy_knn=0.17, w_energy_lat=0.19,
             w_logit_energy_knn=0.23, w_logit_energy_lat=0.29, w_pixel_oe=0.31)
    torch.manual_seed(0)
    loss = OALLoss(LossConfig(**w, club_training="loglik"), student_dim=6, teacher_dim=10, knn_dim=10,
                   latent_dim=4).to(dev)
    feat = torch.randn(8, 6, device=dev, requires_grad=True)
    head = torch.nn.Linear(6, 3).to(dev)
    out = loss(torch.randn(8, 3, device=dev), feat, torch.randint(0, 3, (8,), device=dev),
               t_logits=torch.randn(8, 3, device=dev), t_feat=torch.randn(8, 10, device=dev),
               knn=torch.randn(8, 10, device=dev), latent=torch.randn(8, 4, device=dev), head=head,
               pixel_logits=torch.randn(5, 3, device=dev))
    assert set(out.terms) == {"ce", *(k[2:] for k in w), "micl_knn_q_nll", "micl_lat_q_nll"}
    assert all(v.is_cuda and torch.isfinite(v) for v in out.terms.values())
    out.total.backward()
    assert feat.grad is not None and torch.isfinite(feat.grad).all()


def test_a_checkpoint_saved_on_the_gpu_loads_on_the_cpu(tmp_path):
    from oal import storage

    storage.save_torch({"w": torch.arange(4.0, device="cuda")}, tmp_path / "ckpt.pt")
    back = storage.load_torch(tmp_path / "ckpt.pt", "checkpoint")
    assert back["w"].device.type == "cpu" and back["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
