"""Steady-state step time of the Accelerate loop (`oal.train.fit`) against a plain PyTorch loop.

    python -m bench.overhead [--reps 5] [--epochs 4] [--threads 1] [--device auto] [--loss ce oal]

Both loops train the digits benchmark's resnet_tiny student from the same initial weights, on the
same batches (same sampler and seed), with the same optimizer and schedule. A loop's step time is an
epoch's time divided by its steps, the first epoch of every run left out as warm-up. Runs alternate
plain/accelerate in ABBA order, so machine noise and drift fall on both; medians are reported, and the
ratio is the number to read (absolute times depend on whatever else runs on the machine).

`ce` is plain cross-entropy (fit's `loss=None` path); `oal` is the full OAL loss (teacher forward,
logit and feature KD, both CLUB terms) with an untrained teacher and random outlier vectors, which
cost the same per step as real ones.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from oal import config as C
from oal.data import build_benchmark
from oal.losses import OALLoss
from oal.models import build_student, build_teacher
from oal.train import Loop, OALTerms, fit, resolve_device

GOAL = 0.05  # the target: the Accelerate loop at most 5% slower than a plain loop


@dataclass
class Setup:
    """Everything both loops share; each run deep-copies the modules so that it starts from the same state."""

    train_set: Dataset
    net: nn.Module
    loss: OALLoss | None
    teacher: nn.Module | None
    knn: torch.Tensor | None
    latent: torch.Tensor | None
    cfg: C.OALConfig
    device: str


def make_setup(loss_kind: str, epochs: int, device: str, seed: int = 0) -> Setup:
    cfg = C.load_config("digits", [f"seed={seed}", f"device={device}"])
    # One checkpoint at the very end: fit writes it after the last epoch's timer stops, so it is never timed.
    cfg = replace(cfg, student=replace(cfg.student, epochs=epochs, checkpoint_every=epochs))
    bench = build_benchmark(cfg.data)
    torch.manual_seed(seed)
    net = build_student(cfg.model.student, bench.num_classes)
    if loss_kind == "ce":
        return Setup(bench.train, net, None, None, None, None, cfg, resolve_device(device))
    teacher = build_teacher(cfg.teacher, bench.num_classes, cfg.data.image_size).eval()
    gen = torch.Generator().manual_seed(seed)
    # The shapes the digits pipeline produces: k-NN outliers in the built-in model's 32-d conditioning
    # space (C x M of them), latent vectors 8-d (channel-row mean of 4x8x8 latents).
    knn = torch.randn(bench.num_classes * 400, 32, generator=gen)
    latent = torch.randn(cfg.diffusion.num_outliers, 8, generator=gen)
    loss = OALLoss(cfg.loss, net.feature_dim, teacher.feature_dim, knn.shape[1], latent.shape[1])
    return Setup(bench.train, net, loss, teacher, knn, latent, cfg, resolve_device(device))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_loop(s: Setup) -> tuple[list[float], nn.Module]:
    """A hand-written loop; returns each epoch's seconds per step and the trained network."""
    tc, seed, dev = s.cfg.student, s.cfg.seed, s.device
    net = copy.deepcopy(s.net).to(dev)
    loss = copy.deepcopy(s.loss).to(dev) if s.loss is not None else None
    teacher = s.teacher.to(dev).requires_grad_(False) if s.teacher is not None else None
    knn = s.knn.to(dev) if s.knn is not None else None
    lat = s.latent.to(dev) if s.latent is not None else None
    torch.manual_seed(seed)
    # The same sampler fit uses (one replica = a seeded shuffle), so that both loops see the same batches.
    sampler: DistributedSampler = DistributedSampler(s.train_set, num_replicas=1, rank=0, shuffle=True, seed=seed)
    loader = DataLoader(s.train_set, batch_size=s.cfg.data.batch_size, sampler=sampler)
    groups = [{"params": list(net.parameters()), "lr": tc.lr}]
    if loss is not None:
        if loss.dt is not None:
            groups.append({"params": list(loss.dt.parameters()), "lr": tc.dt_lr})
        clubs = [p for m in (loss.club_knn, loss.club_lat) if m is not None for p in m.parameters()]
        if clubs:
            groups.append({"params": clubs, "lr": tc.club_lr})
    opt = torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(loader) * tc.epochs)
    n_out = s.cfg.loss.outlier_batch_size
    per_step = []
    for epoch in range(tc.epochs):
        net.train()
        sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009)
        running = torch.zeros((), device=dev)  # summed on device: no host sync per step
        _sync(dev)
        t0 = time.perf_counter()
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            logits, feat = net(x)
            if loss is None:
                total = nn.functional.cross_entropy(logits, y)
            else:
                assert teacher is not None and knn is not None and lat is not None
                with torch.no_grad():
                    t_logits, t_feat = teacher(x)
                k = min(n_out, len(x))
                kb = knn[torch.randperm(len(knn), generator=gen)[:k].to(dev)]
                lb = lat[torch.randperm(len(lat), generator=gen)[:k].to(dev)]
                total = loss(logits, feat, y, t_logits, t_feat, kb, lb).total
            total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            running += total.detach()
        float(running)  # one sync per epoch, as a loop that logs the epoch's mean loss would do
        _sync(dev)
        per_step.append((time.perf_counter() - t0) / len(loader))
    return per_step, net


def accelerate_loop(s: Setup) -> tuple[list[float], nn.Module]:
    """`oal.train.fit` as the pipeline calls it, minus validation; epoch times from its history."""
    net = copy.deepcopy(s.net)
    loss = copy.deepcopy(s.loss) if s.loss is not None else None
    steps = math.ceil(len(s.train_set) / s.cfg.data.batch_size)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as d:
        res = fit(net, s.train_set, s.cfg.student, d,
                  Loop(batch_size=s.cfg.data.batch_size, seed=s.cfg.seed, device=s.device, resume=False, progress=False),
                  OALTerms(loss=loss, teacher=s.teacher, knn=s.knn, latent=s.latent, batch_size=s.cfg.loss.outlier_batch_size))
    return [h["epoch_seconds"] / steps for h in res.history], net


def _max_weight_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p.detach().cpu() - q.detach().cpu()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def measure(loss_kind: str, reps: int, epochs: int, device: str) -> dict[str, float]:
    s = make_setup(loss_kind, epochs, device)
    loops: dict[str, Callable[[Setup], tuple[list[float], nn.Module]]] = {"plain": plain_loop, "accelerate": accelerate_loop}
    times: dict[str, list[float]] = {"plain": [], "accelerate": []}
    nets: dict[str, nn.Module] = {}
    for r in range(reps):
        order = ["plain", "accelerate"] if r % 2 == 0 else ["accelerate", "plain"]  # ABBA
        for name in order:
            per_step, nets[name] = loops[name](s)
            times[name] += per_step[1:]  # epoch 1 is warm-up (allocator, lazy init, first-touch of the data)
        print(f"  [{loss_kind}] rep {r + 1}/{reps}: plain {1e3 * statistics.median(times['plain']):.2f} ms, "
              f"accelerate {1e3 * statistics.median(times['accelerate']):.2f} ms (running medians)",
              file=sys.stderr, flush=True)
    plain, accel = statistics.median(times["plain"]), statistics.median(times["accelerate"])
    return {"plain": plain, "accelerate": accel, "ratio": accel / plain, "n": len(times["plain"]),
            "noise_plain": _rel_iqr(times["plain"]), "noise_accel": _rel_iqr(times["accelerate"]),
            "weight_diff": _max_weight_diff(nets["plain"], nets["accelerate"])}


def _rel_iqr(xs: list[float]) -> float:
    """Interquartile range over the median: how much a loop's epochs disagree (the noise floor of the ratio)."""
    if len(xs) < 2:
        return float("nan")
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return (q3 - q1) / statistics.median(xs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="runs of each loop (alternating)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is warm-up")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core machine more threads mostly add noise)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--loss", nargs="+", default=["ce", "oal"], choices=("ce", "oal"))
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is warm-up)")
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = C.load_config("digits")
    n_train = len(build_benchmark(cfg.data).train)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    rows = {k: measure(k, args.reps, args.epochs, device) for k in args.loss}
    labels = {"ce": "cross-entropy (loss=None)", "oal": "full OAL loss"}
    lines = [
        "# Accelerate loop overhead",
        "",
        f"digits train set ({n_train} images), resnet_tiny student, batch {cfg.data.batch_size} "
        f"({math.ceil(n_train / cfg.data.batch_size)} steps/epoch), SGD as configured; device {device}, "
        f"torch threads {args.threads}. Median seconds per step over {args.reps} runs x {args.epochs - 1} "
        "steady-state epochs per loop, runs interleaved ABBA.",
        "",
        "| loss | plain step (ms) | accelerate step (ms) | ratio accel/plain | overhead | IQR/median plain, accel "
        "| max abs weight diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, r in rows.items():
        lines.append(f"| {labels[k]} | {1e3 * r['plain']:.2f} | {1e3 * r['accelerate']:.2f} | {r['ratio']:.3f} | "
                     f"{100 * (r['ratio'] - 1):+.1f}% | {100 * r['noise_plain']:.1f}%, {100 * r['noise_accel']:.1f}% "
                     f"| {r['weight_diff']:.1e} |")
    worst = max(r["ratio"] for r in rows.values()) - 1
    lines += ["", f"Goal: overhead under {100 * GOAL:.0f}%: {'met' if worst < GOAL else 'NOT met'} "
              f"(worst {100 * worst:+.1f}%). The weight diff checks that both loops did the same training "
              "(ce: same batches and updates, expect ~0 up to float reordering; oal: same outlier draws too).",
              f"Runtime: {time.perf_counter() - t0:.0f} s.", ""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
