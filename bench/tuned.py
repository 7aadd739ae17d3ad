"""Ray Tune's choice of loss weights against the fixed recipes, on the test OOD sets, over seeds.

    python -m bench.tuned [--preset fashion] [--trials 12] [--seeds 0 1 2] [--out runs/bench-tuned]
                          [--address ADDR] [--quick] [key=value ...]

1. The search (seed 0, on the Ray cluster at --address, default the local stack's head): `jobs.tune` over every
   loss weight (`config.LOSS_WEIGHTS`: KD, both MICL terms, the reference's energy terms, logit energy and pixel
   OE, each log-uniform in [reference / 10, reference * 10] or off), Optuna's TPE with ASHA stopping, one trial at
   a time (a trial's Ray Train worker takes both cores of a 2-core machine), outliers decoded
   (`diffusion.mode=pixel`) so that pixel OE can be chosen. The objective is the validation OOD class's AUROC,
   never a test set; a trial losing more than `search.max_id_acc_drop` of ID accuracy cannot win.
2. For each seed: the shared stages (base CE student, teacher, embeddings, anchors, k-NN and decoded latent
   outliers; seed 0's are the search's own), then three students on the same files, evaluated on the test near
   and far OOD sets: the reference's weights (full OAL), the best fixed variant of `bench.outlier_cost` (KD +
   pixel OE at OE's 0.5, no other outlier term) and the tuned weights. The CE row is the base student. Each
   row is under the score its evaluation chose on validation.

One diffusion model serves every seed: the one given with `diffusion.checkpoint=PATH` (e.g. the one `make demo`
trains, `runs/fashion/diffusion/checkpoint.pt`; relative paths are made absolute), else the one seed 0's search
trains; seeds vary the classifiers, the k-NN sampling and the diffusion sampling, not the generator. Finished
stages and trials are skipped on a rerun. Writes `<out>/tuned.md`, `tuned.json` and `tuned.png`.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.quality import (
    BASE_ROW,
    NO_OUTLIER_TERMS,
    _outliers,
    base_metrics,
    from_base,
    plot,
    save_report,
    setup,
    shared_stages,
    student_metrics,
    table,
)
from oal import config as C
from oal import stages
from oal.data import build_benchmark

REFERENCE_ROW = "full OAL, reference weights"
FIXED_ROW = "KD + pixel OE 0.5 (best fixed variant, bench.outlier_cost)"
TUNED_ROW = "Ray Tune's best weights"
# Each bench row: its label and the loss overrides that make it (the tuned row's come from the search).
FIXED = {REFERENCE_ROW: (), FIXED_ROW: (*NO_OUTLIER_TERMS, "loss.w_pixel_oe=0.5")}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def search(preset: str, common: list[str], trials: int, address: str | None) -> tuple[list[str], dict, str]:
    """Run (or resume, or replay) the search at seed 0. Returns the tuned weights as overrides, the search
    summary and the trials table."""
    from jobs import common as jc
    from jobs import tune

    cfg = C.load_config(preset, [*common, "seed=0", "name=t-seed0", f"search.weights=[{','.join(C.LOSS_WEIGHTS)}]",
                                 "search.algorithm=optuna", "search.scheduler=asha", f"search.num_samples={trials}",
                                 "search.max_concurrent=1", "search.retrain_best=false"])
    jc.connect(address, log_to_driver=False)
    t0 = time.perf_counter()
    summary = tune.run(cfg, progress=False)
    _log(f"search: {len(summary['trials'])} trials, {summary['epochs_consumed']} student epochs, "
         f"{time.perf_counter() - t0:.0f} s")
    best = C.load_config(summary["best_yaml"])
    weights = [f"loss.{w}={getattr(best.loss, w)}" for w in C.LOSS_WEIGHTS]
    return weights, summary, (cfg.run_dir / "tune" / "trials.md").read_text()


def run_seed(preset: str, common: list[str], seed: int, tuned: list[str]) -> dict[str, dict[str, float]]:
    shared = C.load_config(preset, [*common, f"seed={seed}", f"name=t-seed{seed}"])
    bench = build_benchmark(shared.data)
    t0 = time.perf_counter()
    given, base_ckpt, _ = shared_stages(shared, bench)
    outliers = _outliers(shared, bench)  # diffusion.mode=pixel: the decoded outliers too
    _log(f"[seed {seed}] shared stages: {time.perf_counter() - t0:.0f} s")
    rows = {BASE_ROW: base_metrics(shared, base_ckpt, bench)}
    for (label, overrides), slug in zip([*FIXED.items(), (TUNED_ROW, tuple(tuned))], ("reference", "oe", "tuned")):
        t1 = time.perf_counter()
        cfg = C.load_config(preset, [*common, f"seed={seed}", f"name=t-seed{seed}-{slug}", *overrides, *given,
                                     *from_base(shared, base_ckpt)])
        rows[label] = student_metrics(replace(cfg, outliers=outliers), bench)
        _log(f"[seed {seed}] {label}: near {100 * rows[label]['near AUROC']:.2f}, far "
             f"{100 * rows[label]['far AUROC']:.2f} ({time.perf_counter() - t1:.0f} s)")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tuned", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="embedded preset (default fashion; digits with --quick)")
    p.add_argument("--trials", type=int, default=12, help="trials of the search")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/bench-tuned", help="output root (one run folder per seed and row)")
    p.add_argument("--address", default=None, help="Ray cluster for the search (default: RAY_ADDRESS or the "
                                                   "local stack's head)")
    p.add_argument("--quick", action="store_true", help="tiny digits settings, for checking that it runs")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied to every run")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    preset, base, probe = setup(p, args, ["diffusion.mode=pixel"])
    # Given files by absolute path: the search's Ray workers and actors run in other folders.
    given = C.flatten(C.to_dict(C.absolute_paths(probe)))
    common = [*base, *(f"{k}={given[k]}" for k in C.PATH_KEYS if k != "output_dir" and given.get(k)),
              f"output_dir={out}"]
    t0 = time.perf_counter()
    tuned, summary, trials_md = search(preset, common, args.trials, args.address)
    if stages.trained_diffusion(probe) and probe.diffusion.checkpoint is None:  # seed 0's model for every seed
        seed0 = C.load_config(preset, [*common, "seed=0", "name=t-seed0"])
        common.append(f"diffusion.checkpoint={stages.diffusion_config(seed0).checkpoint}")
    per_seed = {s: run_seed(preset, common, s, tuned) for s in args.seeds}
    seconds = time.perf_counter() - t0
    bench = build_benchmark(probe.data)
    text = "\n".join([
        f"# Ray Tune's weights against the fixed recipes on `{preset}`{' (--quick settings)' if args.quick else ''}",
        "",
        "Scores chosen on validation; "
        f"mean ± sample std over seeds {' '.join(map(str, args.seeds))}, in %, on the test sets (near-OOD: "
        f"{', '.join(bench.near)}; far-OOD: {', '.join(bench.far)}); the last column is the mean per-seed AUROC "
        "difference to the CE row (each row under its validation-chosen score).",
        f"Tuned weights (search at seed 0, {len(summary['trials'])} trials, objective {probe.search.metric} on the "
        f"validation OOD class): {' '.join(w.removeprefix('loss.') for w in tuned)}.",
        f"Overrides: {' '.join(base) or '(none)'}",
        "",
        table(per_seed),
        "",
        "The search's trials (validation numbers, last epoch; ASHA stopped the short ones):",
        "",
        trials_md.strip(),
        "",
        f"Runtime: {seconds:.0f} s on this machine (parts skipped as up to date take ~0 s).",
        "",
    ])
    save_report(out, "tuned", text, lambda path: plot(per_seed, path),
                {"preset": preset, "seeds": args.seeds, "overrides": base, "tuned": tuned, "per_seed": per_seed,
                 "trials": summary["trials"]})


if __name__ == "__main__":
    main()
