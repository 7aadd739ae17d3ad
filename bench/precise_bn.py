"""PreciseBN on `digits`: what recomputing BatchNorm statistics after each epoch costs, and what it changes.

    python -m bench.precise_bn [--reps 2] [--epochs 10] [--images 0 256 2048]

Trains the teacher-free, outlier-free student of the `digits` preset (the tuning baseline: no teacher or
outlier files needed) for `--epochs` epochs once per `student.precise_bn` value, the values alternating
within each rep. Printed side by side: the stage's wall time, its ratio to precise_bn=0, and the ID
validation accuracy after each of the first three epochs (what ASHA's early rungs see), then the last.
The weights are the same for every value (tests/test_train.py); only BatchNorm's statistics differ.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from jobs import tune as jtune
from oal import config as C
from oal import registry
from oal.data import build_benchmark


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.precise_bn", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=2, help="runs of each value (alternating)")
    p.add_argument("--epochs", type=int, default=10, help="student epochs per run")
    p.add_argument("--images", type=int, nargs="+", default=[0, 256, 2048],
                   help="student.precise_bn values (0: off; 2048, the config's default: all 649 digits images)")
    args = p.parse_args(argv)
    if args.epochs < 3:
        p.error("--epochs must be >= 3 (the table shows the first three)")
    if 0 not in args.images:
        p.error("--images must include 0, the reference of the time ratio")
    os.environ.setdefault("TQDM_DISABLE", "1")
    cfg = jtune.baseline_config(C.load_config("digits", [f"student.epochs={args.epochs}"]))
    bench = build_benchmark(cfg.data)
    times: dict[int, list[float]] = {n: [] for n in args.images}
    acc: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-precise-bn-") as tmp:
        for rep in range(args.reps):
            order = args.images if rep % 2 == 0 else args.images[::-1]
            for n in order:
                run = replace(cfg, student=replace(cfg.student, precise_bn=n))
                t0 = time.perf_counter()
                res = registry.train_stage(run, "student", bench=bench, out_dir=Path(tmp) / f"{rep}-{n}", progress=False)
                times[n].append(time.perf_counter() - t0)
                acc[n] = [100 * h["val/id_accuracy"] for h in res.history]  # the same in every rep (seeded)
    ref = statistics.median(times[0])
    lines = ["# PreciseBN cost and effect", "",
             f"digits baseline student (resnet_tiny, no teacher, no outliers), {args.epochs} epochs, "
             f"{len(bench.train)} training images, median of {args.reps} runs per value.", "",  # type: ignore[arg-type]
             "| student.precise_bn | stage, s | ratio | val ID acc. epoch 1 | epoch 2 | epoch 3 | last epoch |",
             "|---|---|---|---|---|---|---|"]
    for n in args.images:
        t = statistics.median(times[n])
        a = acc[n]
        label = f"{n} (all {len(bench.train)})" if n >= len(bench.train) else str(n)  # type: ignore[arg-type]
        lines.append(f"| {label} | {t:.1f} | {t / ref:.2f} | {a[0]:.1f} | {a[1]:.1f} | {a[2]:.1f} | {a[-1]:.1f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
