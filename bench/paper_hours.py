"""GPU-hours of the paper's CIFAR-100 recipe at 224x224, stage by stage, from measured GPU throughput.

    python -m bench.paper_hours [--device auto] [--quick] [--gpus 1,8] [--out FILE.md]

Each compute stage of the reference recipe is timed on random weights (they cost the same as trained ones)
and random inputs already on the device: warm-up iterations, then several timed ones between two
`torch.cuda.synchronize()` calls. Networks run under bf16 autocast on CUDA (`--precision fp32`, and on a CPU: fp32); the Stable
Diffusion UNet runs in fp16 on CUDA. The measured rates are then multiplied out to the recipe's amount of
work (the constants below) and printed as a markdown table of GPU-hours per stage, with the wall-clock hours
on N GPUs under linear data-parallel scaling (synthesis: one actor per GPU, shards as the unit of work).

Data loading and decoding are not measured: these are GPU compute numbers only.

`--quick` is a smoke run for a CPU: 1 warm-up + 1 timed iteration at tiny batches with the real ViT-B/16
and ResNet-18 shapes, and the Stable Diffusion v1 block structure at tiny widths (bench.synthesis's
tiny-check model, 64 px / 8x8 latents) instead of the SD-sized UNet. Its numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.synthesis import Spec, build
from oal.config import LossConfig, TeacherConfig
from oal.diffusion import sample_latents
from oal.losses import OALLoss
from oal.models import build_student, build_teacher
from oal.storage import write_text

# ---- the reference recipe (CIFAR-100, 224x224) ------------------------------------------------------

NUM_CLASSES = 100  # CIFAR-100
IMAGE_SIZE = 224  # input side of teacher and student (CIFAR images upsampled)
TRAIN_IMAGES = 50_000  # CIFAR-100 training set
TEACHER_EPOCHS = 50  # ViT-B/16 fine-tune on the ID training set (cross-entropy)
EMBED_PASSES = 1  # teacher features for k-NN outlier sampling: one eval pass over the training set
BASE_EPOCHS = 100  # the CE baseline student
OAL_EPOCHS = 100  # the OAL student (CE + KD from the frozen teacher + MICL)
LATENT_OUTLIERS = 300  # latent outliers synthesised per run (diffusion.num_outliers)
SHARD_SIZE = 30  # outliers per synthesis shard, the unit a synthesis actor takes (diffusion.shard_size)

TEACHER_BATCH = 64  # teacher fine-tune batch (Adam)
EMBED_BATCH = 256  # teacher eval-forward batch for the embeddings
STUDENT_BATCH = 128  # student batch, base and OAL (data.batch_size reference)
OUTLIER_BATCH = 128  # k-NN and latent outliers per OAL step (loss.outlier_batch_size)
KNN_DIM = 768  # k-NN outliers live in the teacher's feature space (ViT-B/16: 768-d)
LATENT_DIM = 64  # latent outliers: 4x64x64 SD latents reduced to 64-d (channel_row_mean)
EVAL_BATCH = 512  # student eval-forward batch
SYNTH_BATCH = 3  # outliers per sampler call (diffusion.batch_size)
SYNTH_STEPS = 50  # PNDM (PLMS) denoising steps (diffusion.steps)
GUIDANCE = 7.5  # classifier-free guidance scale (diffusion.guidance_scale)

# Evaluation images: OpenOOD v1.5's CIFAR-100 image lists (its benchmark_imglist counts).
ID_TEST = 9_000  # OpenOOD v1.5 CIFAR-100 ID test (1,000 of the 10,000 test images are held out for ID val)
OOD_TEST = {  # OpenOOD v1.5 CIFAR-100 OOD test sets
    "CIFAR-10": 10_000,  # near-OOD, CIFAR-10 test set
    "TIN": 7_793,  # near-OOD, TinyImageNet images without CIFAR classes
    "MNIST": 70_000,  # far-OOD
    "SVHN": 26_032,  # far-OOD, SVHN test set
    "Textures": 5_640,  # far-OOD, DTD
    "Places365": 35_195,  # far-OOD
}
ID_VAL = 1_000  # OpenOOD v1.5 CIFAR-100 ID validation
VAL_TIN = 2_000  # OpenOOD v1.5 CIFAR-100 OOD validation (TinyImageNet)
EVAL_IMAGES = ID_TEST + sum(OOD_TEST.values()) + ID_VAL + VAL_TIN  # 166,660 per evaluated student
KNN_BANK_IMAGES = TRAIN_IMAGES  # the knn postprocessor's feature bank: oal.evaluate passes the training set too
EVAL_MODELS = 2  # students evaluated per run: the CE baseline and the OAL student

# ---- measurement ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Iteration counts and batch sizes of one run (full on a GPU, or --quick)."""

    warmup: int
    iters: int
    synth_warmup: int
    synth_iters: int
    synth_steps: int
    teacher_batch: int
    embed_batch: int
    student_batch: int
    eval_batch: int


FULL = Plan(warmup=5, iters=20, synth_warmup=1, synth_iters=2, synth_steps=SYNTH_STEPS, teacher_batch=TEACHER_BATCH,
            embed_batch=EMBED_BATCH, student_batch=STUDENT_BATCH, eval_batch=EVAL_BATCH)
QUICK = Plan(warmup=1, iters=1, synth_warmup=1, synth_iters=1, synth_steps=3, teacher_batch=2, embed_batch=4,
             student_batch=4, eval_batch=8)


@dataclass
class Stage:
    name: str
    unit: str  # what the rate counts: images or outliers
    rate: float  # units per second, measured
    precision: str
    work: str  # the recipe's amount of work, in words
    units: float  # the recipe's amount of work, in `unit`
    shards: int = 0  # synthesis only: work items spread over actors (0: data-parallel)
    note: str = ""

    @property
    def gpu_hours(self) -> float:
        return self.units / self.rate / 3600

    def wall_hours(self, gpus: int) -> float:
        if not self.shards:
            return self.gpu_hours / gpus  # linear data-parallel scaling
        # One actor per GPU; each takes whole shards, so the slowest actor does ceil(shards / N) of them.
        return math.ceil(self.shards / gpus) * (self.units / self.shards) / self.rate / 3600


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PRECISION = {"value": "bf16"}  # --precision: bf16 autocast on CUDA, or fp32 throughout (as the reference trains)


def _amp(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and PRECISION["value"] == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_per_iter(step: Callable[[], object], warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call of `step`: `warmup` calls, then `iters` timed calls between two synchronisations."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def _images(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)  # (n, 3, 224, 224)
    y = torch.randint(0, NUM_CLASSES, (n,), device=device)  # (n,)
    return x, y


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_fine_tune(plan: Plan, device: torch.device, teacher: nn.Module) -> float:
    """Teacher fine-tune step (CE, Adam, forward + backward + step), images/s."""
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-4)
    x, y = _images(plan.teacher_batch, device)  # (B, 3, 224, 224), (B,)

    def step() -> None:
        with _amp(device):
            logits, _ = teacher(x)  # (B, 100)
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    teacher.train()
    rate = plan.teacher_batch / time_per_iter(step, plan.warmup, plan.iters, device)
    _log(f"  teacher fine-tune: {rate:.1f} images/s")
    return rate  # the optimizer and its state go with this frame


def measure_embeddings(plan: Plan, device: torch.device, teacher: nn.Module) -> float:
    """Teacher eval forward (the embeddings stage), images/s."""
    teacher.eval().requires_grad_(False)
    x, _ = _images(plan.embed_batch, device)  # (B, 3, 224, 224)

    @torch.no_grad()
    def step() -> None:
        with _amp(device):
            teacher(x)  # (B, 100), (B, 768)

    rate = plan.embed_batch / time_per_iter(step, plan.warmup, plan.iters, device)
    _log(f"  embeddings: {rate:.1f} images/s")
    return rate


def _sgd(groups: list[dict]) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=0.005, momentum=0.9, nesterov=True, weight_decay=5e-4)


def measure_base(plan: Plan, device: torch.device) -> float:
    """CE student step (ResNet-18 at 224, Nesterov SGD), images/s."""
    torch.manual_seed(0)
    student = build_student("resnet18_224", NUM_CLASSES).to(device).train()
    opt = _sgd([{"params": list(student.parameters())}])
    x, y = _images(plan.student_batch, device)  # (B, 3, 224, 224), (B,)

    def step() -> None:
        with _amp(device):
            logits, _ = student(x)  # (B, 100)
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rate = plan.student_batch / time_per_iter(step, plan.warmup, plan.iters, device)
    _log(f"  base student step: {rate:.1f} images/s")
    return rate


def measure_oal(plan: Plan, device: torch.device, teacher: nn.Module,
                teacher_amp: bool = True) -> tuple[nn.Module, float]:
    """OAL student step: frozen teacher forward + student forward/backward + OALLoss (all four terms), as in
    oal.train.fit (DT projector and CLUB q-networks in the same SGD, each group at its own learning rate).
    Returns the trained-for-a-few-steps student (for the eval measurement) and images/s."""
    torch.manual_seed(0)
    student = build_student("resnet18_224", NUM_CLASSES).to(device).train()
    loss_fn = OALLoss(LossConfig(), student_dim=student.feature_dim, teacher_dim=768, knn_dim=KNN_DIM,
                      latent_dim=LATENT_DIM).to(device).train()
    assert loss_fn.dt is not None and loss_fn.club_knn is not None and loss_fn.club_lat is not None
    opt = _sgd([{"params": list(student.parameters())},
                {"params": list(loss_fn.dt.parameters()), "lr": 0.01},  # student.dt_lr
                {"params": [*loss_fn.club_knn.parameters(), *loss_fn.club_lat.parameters()], "lr": 1e-4}])  # club_lr
    x, y = _images(plan.student_batch, device)  # (B, 3, 224, 224), (B,)
    n_out = min(OUTLIER_BATCH, plan.student_batch)  # fit caps the outlier batch at the ID batch
    knn = torch.randn(n_out, KNN_DIM, device=device)  # (n_out, 768)
    lat = torch.randn(n_out, LATENT_DIM, device=device)  # (n_out, 64)
    teacher_ctx = (lambda: _amp(device)) if teacher_amp else contextlib.nullcontext

    def step() -> None:
        with torch.no_grad(), teacher_ctx():
            t_logits, t_feat = teacher(x)  # (B, 100), (B, 768)
        with _amp(device):
            logits, feat = student(x)  # (B, 100), (B, 512)
            out = loss_fn(logits.float(), feat.float(), y, t_logits.float(), t_feat.float(), knn, lat)
        out.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rate = plan.student_batch / time_per_iter(step, plan.warmup, plan.iters, device)
    return student, rate


def measure_eval(plan: Plan, device: torch.device, student: nn.Module) -> float:
    """Student eval forward at 224, images/s."""
    student.eval()
    x, _ = _images(plan.eval_batch, device)  # (B, 3, 224, 224)

    @torch.no_grad()
    def step() -> None:
        with _amp(device):
            student(x)  # (B, 100), (B, 512)

    rate = plan.eval_batch / time_per_iter(step, plan.warmup, plan.iters, device)
    _log(f"  evaluation forward: {rate:.1f} images/s")
    return rate


def measure_synthesis(plan: Plan, device: torch.device, quick: bool) -> tuple[float, str]:
    """Latent outliers/s: classifier-free-guided PNDM (PLMS) sampling, batch 3, never decoded."""
    spec = Spec(sd_size=True, tiny_check=quick, device=device.type, dtype="fp16" if device.type == "cuda" else "fp32",
                steps=plan.synth_steps, batch=SYNTH_BATCH, resolution=None, threads=torch.get_num_threads())
    model, dcfg, cond, uncond = build(spec)  # cond, uncond: (3, 77, E)
    dcfg = replace(dcfg, scheduler="pndm", guidance_scale=GUIDANCE)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        sample_latents(model, cond, uncond, dcfg, gen)  # (3, 4, h, w); 2x3 UNet rows per step (guidance)

    rate = SYNTH_BATCH / time_per_iter(step, plan.synth_warmup, plan.synth_iters, device)
    lat = model.latent_size(dcfg.resolution)
    what = (f"{model.model_id}, {lat}x{lat} latents ({lat * model.vae_factor} px), PNDM {plan.synth_steps} steps, "
            f"guidance {GUIDANCE}, batch {SYNTH_BATCH}")
    _log(f"  latent synthesis: {rate:.3f} outliers/s ({what})")
    return rate, what


def measure(plan: Plan, device: torch.device, quick: bool) -> tuple[list[Stage], list[str]]:
    net_prec = "bf16 autocast" if device.type == "cuda" and PRECISION["value"] == "bf16" else "fp32"
    notes: list[str] = []
    _log("measuring (teacher) ...")
    teacher = build_teacher(TeacherConfig(network="vit_b16"), NUM_CLASSES, IMAGE_SIZE).to(device)
    fine_tune = measure_fine_tune(plan, device, teacher)
    _free(device)
    embed = measure_embeddings(plan, device, teacher)  # the teacher is frozen from here on
    _log("measuring (students) ...")
    base = measure_base(plan, device)
    _free(device)
    student, oal = measure_oal(plan, device, teacher)
    _log(f"  OAL student step: {oal:.1f} images/s")
    del teacher
    _free(device)
    evaluation = measure_eval(plan, device, student)
    del student
    _free(device)
    _log("measuring (synthesis) ...")
    synth, synth_what = measure_synthesis(plan, device, quick)
    _free(device)
    synth_prec = "fp16" if device.type == "cuda" else "fp32"
    n_shards = math.ceil(LATENT_OUTLIERS / SHARD_SIZE)
    eval_units = EVAL_MODELS * (EVAL_IMAGES + KNN_BANK_IMAGES)
    stages = [
        Stage("teacher fine-tune (ViT-B/16, Adam, CE)", "images", fine_tune, net_prec,
              f"{TEACHER_EPOCHS} epochs x {TRAIN_IMAGES:,}", TEACHER_EPOCHS * TRAIN_IMAGES),
        Stage("embeddings (teacher eval forward)", "images", embed, net_prec,
              f"{EMBED_PASSES} pass x {TRAIN_IMAGES:,}", EMBED_PASSES * TRAIN_IMAGES),
        Stage("base student (ResNet-18, CE, SGD)", "images", base, net_prec,
              f"{BASE_EPOCHS} epochs x {TRAIN_IMAGES:,}", BASE_EPOCHS * TRAIN_IMAGES),
        Stage("OAL student (+ frozen teacher fwd, OALLoss)", "images", oal, net_prec,
              f"{OAL_EPOCHS} epochs x {TRAIN_IMAGES:,}", OAL_EPOCHS * TRAIN_IMAGES),
        Stage("latent outlier synthesis (SD v1 UNet, CFG)", "outliers", synth, synth_prec,
              f"{LATENT_OUTLIERS} outliers ({n_shards} shards of {SHARD_SIZE})", LATENT_OUTLIERS, shards=n_shards,
              note=synth_what),
        Stage("evaluation (student eval forward)", "images", evaluation, net_prec,
              f"{EVAL_MODELS} students x ({EVAL_IMAGES:,} OpenOOD + {KNN_BANK_IMAGES:,} train)", eval_units),
    ]
    return stages, notes


# ---- report -----------------------------------------------------------------------------------------

def _h(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if x >= 0.001 else f"{x:.2e}"


def _rate(r: float) -> str:
    return f"{r:,.0f}" if r >= 100 else f"{r:.3g}"


def report(stages: list[Stage], notes: list[str], gpus: list[int], device: torch.device, plan: Plan, quick: bool,
           runtime: float) -> str:
    if device.type == "cuda":
        dev = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        dev = f"CPU, {torch.get_num_threads()} torch threads"
    lines = [
        "# GPU-hours of the OAL paper's CIFAR-100 recipe (224x224)",
        "",
        f"Device: {dev}; torch {torch.__version__}.",
        f"Mode: {'--quick (smoke run: tiny batches, NOT representative of a GPU)' if quick else 'full'}; "
        f"{plan.warmup} warm-up + {plan.iters} timed iterations per network stage, synthesis {plan.synth_warmup} "
        f"warm-up + {plan.synth_iters} timed batch(es) of {plan.synth_steps} steps. Random weights and random inputs "
        "already on the device.",
        f"Batches: teacher fine-tune {plan.teacher_batch}, embeddings {plan.embed_batch}, students "
        f"{plan.student_batch} (outliers {min(OUTLIER_BATCH, plan.student_batch)} k-NN {KNN_DIM}-d + latent "
        f"{LATENT_DIM}-d per OAL step), evaluation {plan.eval_batch}, synthesis {SYNTH_BATCH}.",
        "**GPU compute only: data loading and image decoding are not included.**",
        "",
    ]
    head = ["stage", "precision", "work", "measured throughput", "GPU-hours (1 GPU)"]
    head += [f"wall-clock h, {n} GPU{'s' if n > 1 else ''} [1]" for n in gpus]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for s in stages:
        row = [s.name, s.precision, s.work, f"{_rate(s.rate)} {s.unit}/s", _h(s.gpu_hours)]
        row += [_h(s.wall_hours(n)) for n in gpus]
        lines.append("| " + " | ".join(row) + " |")
    total = ["**total**", "", "", "", f"**{_h(sum(s.gpu_hours for s in stages))}**"]
    total += [f"**{_h(sum(s.wall_hours(n) for s in stages))}**" for n in gpus]
    lines.append("| " + " | ".join(total) + " |")
    synth = next(s for s in stages if s.shards)
    lines += [
        "",
        "[1] Assumes linear data-parallel scaling (GPU-hours / N): no gradient all-reduce cost and the measured "
        "per-GPU throughput at every N (with a fixed global batch, N GPUs get 1/N of it each and may run below "
        f"the measured rate). Synthesis scales by actors, one per GPU, each taking whole shards of {SHARD_SIZE} "
        f"outliers: ceil({synth.shards} / N) shards on the busiest actor, so no gain beyond {synth.shards} GPUs. "
        "The total's wall-clock sums the stages, run one after another.",
        "",
        f"Synthesis model: {synth.note}; fp16 on CUDA, latents never decoded, prompt encoding outside the timing."
        + (" In --quick: SD v1's block structure at tiny widths (bench.synthesis's tiny-check model), not the "
           "SD-sized UNet." if quick else ""),
        "Evaluation images are OpenOOD v1.5's CIFAR-100 counts: ID test "
        f"{ID_TEST:,}, OOD test {', '.join(f'{k} {v:,}' for k, v in OOD_TEST.items())}, ID val {ID_VAL:,}, "
        f"val TIN {VAL_TIN:,} (= {EVAL_IMAGES:,}), plus the {KNN_BANK_IMAGES:,} training images the knn "
        f"postprocessor's feature bank needs, for each of {EVAL_MODELS} students (base and OAL).",
        "Not included: per-epoch validation and PreciseBN passes, k-NN outlier sampling (faiss), the anchor "
        "projection, checkpointing.",
        *notes,
        f"Runtime of this benchmark: {runtime:.0f} s.",
        "",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet_tqdm() -> Iterator[None]:
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


def _gpus(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpus '{text}': expected comma-separated integers, e.g. 1,8") from None
    if not out or any(n < 1 for n in out):
        raise argparse.ArgumentTypeError(f"--gpus '{text}': expected integers >= 1")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.paper_hours", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="smoke run: tiny batches and iteration counts (CPU-able)")
    p.add_argument("--gpus", type=_gpus, default=[1, 8], help="GPU counts for the wall-clock columns (default 1,8)")
    p.add_argument("--out", default=None, help="also write the markdown table here (atomically)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                   help="networks under bf16 autocast (student.mixed_precision=bf16 in a preset) or in fp32 (the "
                        "presets' default, as the reference trains); the SD UNet is fp16 either way")
    args = p.parse_args(argv)
    PRECISION["value"] = args.precision
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    if name == "cpu" and not args.quick:
        p.error("the full run needs a CUDA device (ViT-B/16 and an SD-sized UNet take hours on a CPU); use --quick")
    device = torch.device(name)
    plan = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    with _quiet_tqdm():
        stages, notes = measure(plan, device, args.quick)
    text = report(stages, notes, args.gpus, device, plan, args.quick, time.perf_counter() - t0)
    print(text)
    if args.out:
        write_text(text, args.out)


if __name__ == "__main__":
    main()
