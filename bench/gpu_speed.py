"""Before and after, in one run: the two loops a GPU spends its time in, under each setting oal has for them.

    python -m bench.gpu_speed [--quick] [--out FILE.md] [--no-compile]

1. The OAL student's training step at the paper's CIFAR-100 scale (ResNet-18 student at 224 px, batch 128, the
   frozen ViT-B/16 teacher's forward on every batch, OALLoss with all four terms), through `oal.train.train_step`,
   the function `fit` calls, set up as `fit` sets it up (`make_accelerator`, `frozen_teacher`, `to_device`):
   fp32 everywhere (what `fit` did before), bf16 autocast with the teacher under it, + a bf16 copy of the
   teacher, + channels-last (today's default on a GPU). Images/s, teacher included.
2. Latent sampling with a Stable-Diffusion-v1-sized UNet (fp16, 64x64 latents, DDIM 20 steps, guidance 7.5,
   batch 3 as the reference's): classic attention (softmax of a materialised score matrix), scaled-dot-product
   attention (what `oal.diffusion.prepare_unet` sets), and that plus `torch.compile` (diffusion.compile=default;
   the compile itself, on the first call, is reported apart). UNet steps/s.

Random weights and random inputs already on the device (they cost what trained ones cost); warm-up calls, then
timed calls between two synchronisations. Every variant runs in a fresh process (Accelerate keeps one mixed
precision per process; compiled code and the allocator's cache stay out of the next variant). `--quick` is a
smoke run for a CPU: batch 2, one timed call, bench.synthesis's tiny-width UNet: its numbers say nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

from bench.paper_hours import time_per_iter

TRAIN = [  # label, TrainConfig fields
    ("fp32 student and teacher (before)", {"mixed_precision": "no", "teacher_dtype": "fp32", "channels_last": False}),
    ("bf16 autocast, teacher under autocast", {"mixed_precision": "bf16", "teacher_dtype": "fp32",
                                               "channels_last": False}),
    ("+ bf16 copy of the teacher", {"mixed_precision": "bf16", "teacher_dtype": "bf16", "channels_last": False}),
    ("+ channels-last (the default on a GPU)", {"mixed_precision": "auto", "teacher_dtype": "auto",
                                                "channels_last": True}),
]
SAMPLE = [  # label, attention, diffusion.compile
    ("classic attention (before)", {"attention": "classic", "compile": "off"}),
    ("scaled-dot-product attention (oal's)", {"attention": "sdpa", "compile": "off"}),
    ("+ torch.compile (diffusion.compile=default)", {"attention": "sdpa", "compile": "default"}),
]
STUDENT_BATCH, OUTLIER_BATCH, NUM_CLASSES, IMAGE_SIZE = 128, 128, 100, 224
SAMPLE_BATCH, SAMPLE_STEPS = 3, 20


def _timed(step: Any, warmup: int, iters: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the warm-up calls, seconds per timed call), each between two synchronisations."""
    return warmup * time_per_iter(step, 0, warmup, device), time_per_iter(step, 0, iters, device)


def train_rate(fields: dict[str, Any], quick: bool) -> dict[str, float]:
    """Images/s of `oal.train.train_step` for the OAL student with its frozen teacher."""
    from oal.config import LossConfig, TeacherConfig, TrainConfig
    from oal.losses import OALLoss
    from oal.models import build_student, build_teacher
    from oal.train import Step, make_accelerator, make_optimizer, place, to_device, train_step

    batch = 2 if quick else STUDENT_BATCH
    cfg = TrainConfig(**fields)
    acc = make_accelerator("auto", cfg)
    torch.manual_seed(0)
    student = build_student("resnet18_224", NUM_CLASSES)
    teacher = build_teacher(TeacherConfig(network="vit_b16"), NUM_CLASSES, IMAGE_SIZE)
    loss = OALLoss(LossConfig(), student.feature_dim, teacher.feature_dim, knn_dim=teacher.feature_dim,
                   latent_dim=64)
    optimizer = make_optimizer(student, loss, cfg)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10_000)
    model, optimizer, teacher, last = place(Step(student, loss), optimizer, teacher, acc, cfg)
    x = to_device(torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE), acc, last)  # (B, 3, 224, 224)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=acc.device)  # (B,)
    n_out = min(OUTLIER_BATCH, batch)
    knn = torch.randn(n_out, teacher.feature_dim, device=acc.device)  # (n_out, 768)
    lat = torch.randn(n_out, 64, device=acc.device)  # (n_out, 64)

    def step() -> None:
        total, _ = train_step(acc, model, optimizer, scheduler, teacher, x, y, knn, lat)
        if not torch.isfinite(total.detach()):  # fit's own check syncs once per step too
            raise RuntimeError("non-finite loss in the benchmark step")

    warm_s, per = _timed(step, 1 if quick else 5, 1 if quick else 20, acc.device)
    return {"rate": batch / per, "warmup_s": warm_s, "precision": acc.mixed_precision,
            "teacher_dtype": str(next(teacher.parameters()).dtype).replace("torch.", ""), "channels_last": last}


def sample_rate(fields: dict[str, Any], quick: bool) -> dict[str, float]:
    """UNet steps/s of `oal.diffusion.sample_latents` (classifier-free guidance: 2 x batch rows per step)."""
    from diffusers.models.attention_processor import AttnProcessor

    from bench.synthesis import Spec, build
    from oal.diffusion import prepare_unet, sample_latents

    cuda = torch.cuda.is_available()
    spec = Spec(sd_size=True, tiny_check=quick, device="cuda" if cuda else "cpu", dtype="fp16" if cuda else "fp32",
                steps=2 if quick else SAMPLE_STEPS, batch=SAMPLE_BATCH, resolution=None,
                threads=torch.get_num_threads())
    model, dcfg, cond, uncond = build(spec)
    if fields["attention"] == "classic":
        model.unet.set_attn_processor(AttnProcessor())
    model.unet = prepare_unet(model.unet, model.vae, fields["compile"]) if fields["attention"] == "sdpa" else model.unet
    gen = torch.Generator().manual_seed(0)
    warm_s, per = _timed(lambda: sample_latents(model, cond, uncond, dcfg, gen), 1, 1 if quick else 3, model.device)
    return {"rate": spec.steps / per, "warmup_s": warm_s}


def _child(kind: str, fields: dict[str, Any], quick: bool) -> dict[str, Any]:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    arg = json.dumps({"kind": kind, "fields": fields, "quick": quick})
    p = subprocess.run([sys.executable, "-m", "bench.gpu_speed", "--child", arg], capture_output=True, text=True,
                       env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run (tiny batch and UNet widths)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (it compiles for minutes)")
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        job = json.loads(a.child)
        fn = train_rate if job["kind"] == "train" else sample_rate
        print("RESULT " + json.dumps(fn(job["fields"], job["quick"])), flush=True)
        return 0
    t0 = time.perf_counter()
    dev = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})" if torch.cuda.is_available() else \
        f"CPU, {torch.get_num_threads()} threads"
    lines = [f"# GPU speed before and after: {dev}, torch {torch.__version__}", ""]
    if a.quick:
        lines += ["**--quick: a smoke run, tiny batches and widths; the numbers say nothing about a GPU.**", ""]
    ok = True
    batch, width = (2, "tiny-width, fp32, 8x8 latents") if a.quick else (STUDENT_BATCH, "fp16, 64x64 latents")
    for title, unit, kind, rows in (
            (f"OAL student training step (ResNet-18 224 px, batch {batch}, frozen ViT-B/16 teacher, "
             "all four loss terms)", "images/s", "train", TRAIN),
            (f"Latent sampling (SD-v1-sized UNet, {width}, DDIM {2 if a.quick else SAMPLE_STEPS}, CFG, batch "
             f"{SAMPLE_BATCH})", "UNet steps/s", "sample", SAMPLE)):
        lines += [f"## {title}", "", f"| setting | {unit} | vs first row | first calls (warm-up), s |",
                  "|---|---|---|---|"]
        first = None
        for label, fields in rows:
            if a.no_compile and fields.get("compile", "off") != "off":
                continue
            print(f"{kind}: {label} ...", file=sys.stderr, flush=True)
            r = _child(kind, fields, a.quick)
            if "error" in r:
                ok = False
                lines.append(f"| {label} | failed: {r['error'][:200]} | | |")
                print(f"  failed: {r['error']}", file=sys.stderr, flush=True)
                continue
            first = first or r["rate"]
            lines.append(f"| {label} | {r['rate']:,.1f} | {r['rate'] / first:.2f}x | {r['warmup_s']:.1f} |")
            print(f"  {r['rate']:,.2f} {unit}", file=sys.stderr, flush=True)
        lines.append("")
    lines.append(f"Runtime: {time.perf_counter() - t0:.0f} s. Command: `python -m bench.gpu_speed"
                 f"{' --quick' if a.quick else ''}{' --no-compile' if a.no_compile else ''}`.")
    report = "\n".join(lines) + "\n"
    print(report)
    if a.out:
        from oal.storage import write_text

        write_text(report, a.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
