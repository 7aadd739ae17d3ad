"""Search budget: ASHA vs full-budget random search over the loss weights (jobs/tune.py), on `digits`.

    . .stack/env && python -m bench.tune_budget [--quick] [--trials 16] [--epochs 20] [--seed 0] [--out DIR]

Needs a running Ray head (token auth), e.g. `python -m cluster.stack up --services ray && . .stack/env`.
Both arms call `jobs.tune.run` on the same preset, seed, random searcher and number of trials, so the
seeded searcher draws the same weight settings in both and the arms differ only in the scheduler:
FIFO (every trial trains all `student.epochs`) against ASHA (`max_t` = those epochs, grace period and
reduction factor from the flags). Printed side by side, one Markdown table: epochs in two counts, Tune's
(`epochs_consumed`: the sum over trials of their last `training_iteration`, as `jobs.tune.summarize`
counts it) and the epochs trained (the newest epoch in each trial's Ray Train checkpoints: a trial that
ASHA stops trains on until Tune kills it, so Tune's count is low); the best trial's validation objective
(the validation OOD AUROC, less 1 when the trial lost too much ID accuracy), its validation OOD AUROC and ID
accuracy, all at its last epoch as `jobs.tune.summarize` ranks trials, and the search's wall time; then the ratios
against the issue's goal: ASHA's best objective within 0.5 AUROC points of FIFO's, using at most 35% of
FIFO's epochs (judged on the epochs trained).

Both arms share one run folder: the stages before the student (teacher, embeddings, anchors, k-NN and
latent outliers, the baseline student of the ID-accuracy constraint) are built once, untimed, before the
arms, and each arm's `run` skips them by fingerprint. Their Tune experiments are distinct (the folder name
fingerprints the search config, scheduler included); a search folder left by an earlier benchmark in the
same `--out` is deleted first, since `run` would restore it instead of searching. MLflow is off. The
repository goes to the cluster as the job's working dir, so trials started late run the same code as the
first ones even if the working tree changes meanwhile.
FIFO runs first, then ASHA: one run each, so on a 2-core machine that other work shares, wall times are
indicative only; epochs and AUROC do not depend on the load (a weight setting trained in both arms starts from
the same seeded weights; ASHA's decisions can depend on which trial reports first).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from oal import config as C

REPO = Path(__file__).resolve().parent.parent
AUROC_GOAL = 0.5  # the issue: ASHA's best within 0.5 AUROC points of full-budget random search...
EPOCH_GOAL = 0.35  # ...using at most 35% of its epochs


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def runtime_env(address: str) -> dict[str, Any]:
    """This repository as the job's working dir, as `ray job submit` ships it (cluster/runtime_env.yaml): the
    trials, started over many minutes, run the code as it was at the start, not a working tree edited since."""
    import yaml

    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text()) or {}
    excludes = list(dict.fromkeys([*env.get("excludes", []), "docs", ".whl"]))  # not needed by a trial
    # An empty URI turns tracking off in the workers too (the head's environment may name a server).
    env_vars = {**env.get("env_vars", {}), "MLFLOW_TRACKING_URI": ""}
    if address != "auto":
        # With several heads on one machine, Ray Train's PlacementGroupCleaner looks its controller up on the
        # most recently started one unless RAY_ADDRESS names its own, finds it missing and removes the
        # run's placement group (the run fails at its start with "placement group was removed").
        env_vars["RAY_ADDRESS"] = address
    return {"working_dir": str(REPO), "excludes": excludes, "env_vars": env_vars}


def connect() -> float:
    """Join the running head (never start one here: it would die with this process); returns its CPUs."""
    import ray

    from jobs import common

    address = common.driver_address()
    common.connect(address, log_to_driver=False, runtime_env=runtime_env(address))
    return float(ray.cluster_resources().get("CPU", 0))


def arm_config(out: Path, scheduler: str, args: argparse.Namespace) -> C.OALConfig:
    quick = list(C.QUICK_OVERRIDES) if args.quick else []
    return C.load_config("digits", [*quick, *args.overrides, f"output_dir={out}", "name=tb", f"seed={args.seed}",
                                   f"student.epochs={args.epochs}", "search.algorithm=random",
                                   f"search.scheduler={scheduler}", f"search.num_samples={args.trials}",
                                   f"search.max_concurrent={args.concurrent}", f"search.grace_period={args.grace}",
                                   f"search.reduction_factor={args.reduction}", "search.retrain_best=false"])


def prepare_shared(cfg: C.OALConfig) -> None:
    """Untimed: the teacher, outlier and baseline stages, with the inputs `jobs.tune.run` gives them (every
    weight that a trial may switch on), so that both arms skip them and their wall time is the search alone."""
    from jobs import pipeline
    from jobs import tune as jtune
    from oal.tracking import Tracker

    loss = replace(cfg.loss, **{w: max(getattr(cfg.loss, w), getattr(jtune.REFERENCE, w)) for w in cfg.search.weights})
    full = pipeline.prepare(replace(cfg, loss=loss), Tracker(None), {}, progress=False)
    jtune.baseline_accuracy(full, progress=False)


def manifests(out: Path) -> dict[Path, float]:
    """Shared stages' manifests and their mtimes (each trial writes its own in its folder, left out): a shared
    stage rebuilt inside an arm would inflate its wall time."""
    return {p: p.stat().st_mtime for p in out.glob("*/*/stage.json") if "-trial-" not in p.parent.parent.name}


def trained_epochs(cfg: C.OALConfig, trial: str) -> int:
    """Epochs a trial's Ray Train run finished: the newest epoch among its kept checkpoints (one per epoch).
    Tune counts only the results it took in; a trial that ASHA stops goes on training until it is killed."""
    from oal.storage import load_torch
    from oal.train import CHECKPOINT

    name = f"{cfg.name}-trial-{trial}"  # jobs.tune.trial_config's run name; the trainer's is <name>-student
    storage = Path(cfg.cluster.storage_path or Path(cfg.output_dir) / name / "ray")
    return max((int(load_torch(p, "checkpoint")["epoch"]) for p in storage.glob(f"{name}-student/checkpoint_*/{CHECKPOINT}")),
               default=0)


def run_arm(cfg: C.OALConfig) -> dict[str, Any]:
    from jobs import tune as jtune
    from oal.tracking import Tracker

    for old in (cfg.run_dir / "ray").glob(f"{cfg.name}-tune-*"):
        shutil.rmtree(old)  # `run` would restore a finished search, not run it again
    before = manifests(Path(cfg.output_dir))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Tune's status tables: stdout keeps only the result table
        summary = jtune.run(cfg, progress=False, tracker=Tracker(None))
    wall = time.perf_counter() - t0
    rebuilt = sorted(str(p.parent.relative_to(cfg.output_dir)) for p, m in manifests(Path(cfg.output_dir)).items()
                     if before.get(p) != m)
    # `run` writes its trials table into one folder for every search of this run: keep each arm's copy.
    tune_dir = cfg.run_dir / "tune"
    shutil.copyfile(tune_dir / "trials.md", tune_dir / f"trials-{cfg.search.scheduler}.md")
    full = sum(t["epochs"] == cfg.student.epochs for t in summary["trials"])
    trained = sum(trained_epochs(cfg, t["trial"]) for t in summary["trials"])
    return {"summary": summary, "wall": wall, "rebuilt": rebuilt, "full": full, "trained": trained}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tune_budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: quick overrides, 4 trials of 3 epochs by default")
    p.add_argument("--trials", type=int, default=None, help="trials per arm (search.num_samples); default 16")
    p.add_argument("--epochs", type=int, default=None,
                   help="student epochs: FIFO's budget per trial, ASHA's max_t; default 20 (the preset's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the searcher and of training (both arms)")
    p.add_argument("--concurrent", type=int, default=2, help="trials at once (search.max_concurrent)")
    p.add_argument("--grace", type=int, default=1, help="ASHA grace period, epochs")
    p.add_argument("--reduction", type=float, default=C.SearchConfig.reduction_factor,
                   help="ASHA reduction factor (default: the config's, 4)")
    p.add_argument("--out", type=Path, default=None,
                   help="run folder, kept (reusing its shared stages); default: a temporary one, deleted")
    p.add_argument("overrides", nargs="*", help="more dotted overrides for both arms, e.g. teacher.epochs=10")
    args = p.parse_args(argv)
    args.trials = args.trials or (4 if args.quick else 16)
    args.epochs = args.epochs or (3 if args.quick else 20)
    os.environ.setdefault("TQDM_DISABLE", "1")
    # `. .stack/env` names a tracking server that may not be running; the Tracker passed to `run` is off too.
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    cpus = connect()
    out = (args.out or Path(tempfile.mkdtemp(prefix="bench-tune-budget-"))).resolve()  # Ray workers need it absolute
    t0 = time.perf_counter()
    try:
        cfgs = {s: arm_config(out, s, args) for s in ("fifo", "asha")}
        log(f"shared stages (teacher, outliers, baseline student) in {out}")
        t1 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            prepare_shared(cfgs["fifo"])
        prep = time.perf_counter() - t1
        arms: dict[str, dict[str, Any]] = {}
        for s, cfg in cfgs.items():
            log(f"{s}: {args.trials} trials, up to {args.epochs} epochs each")
            arms[s] = run_arm(cfg)
            a = arms[s]
            log(f"{s}: {a['summary']['epochs_consumed']} epochs, best objective "
                f"{a['summary']['best']['objective']:.4f}, {a['wall']:.0f} s")
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)

    f, a = arms["fifo"], arms["asha"]
    ratio = a["summary"]["epochs_consumed"] / f["summary"]["epochs_consumed"]
    ratio_trained = a["trained"] / f["trained"]  # the goal's: what was computed, not what Tune saw
    diff = 100 * (a["summary"]["best"]["objective"] - f["summary"]["best"]["objective"])
    ok_epochs, ok_auroc = ratio_trained <= EPOCH_GOAL, diff >= -AUROC_GOAL
    c = cfgs["asha"].search
    lines = [
        "# Search budget: ASHA vs full-budget random search", "",
        f"`digits`{' (--quick)' if args.quick else ''}, seed {args.seed}, random search over "
        f"{', '.join(c.weights)}, {args.trials} trials per arm, {args.concurrent} at once, {args.epochs} student "
        f"epochs per full trial; ASHA grace {c.grace_period}, reduction factor {c.reduction_factor:g}. "
        f"Ray head: {cpus:g} CPUs. Objective, AUROC and accuracy in %, of the best trial, at its last epoch.", "",
        "| arm | trials | at full budget | epochs (Tune's count) | epochs trained | best objective "
        "| its val OOD AUROC | its val ID acc | its epochs | wall, s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in (("random, FIFO (full budget)", f), ("random, ASHA", a)):
        s, b = arm["summary"], arm["summary"]["best"]
        lines.append(f"| {name} | {len(s['trials'])} | {arm['full']} | {s['epochs_consumed']} | {arm['trained']} | "
                     f"{100 * b['objective']:.2f} | {100 * b['val_ood_auroc']:.2f} | {100 * b['val_id_accuracy']:.2f} "
                     f"| {b['epochs']} | {arm['wall']:.0f} |")
    lines += [
        f"| ASHA / FIFO | | | {ratio:.3f} ({100 * ratio:.1f}%) | {ratio_trained:.3f} ({100 * ratio_trained:.1f}%) | "
        f"{diff:+.2f} points | | | | {a['wall'] / f['wall']:.2f} |", "",
        "Epochs (Tune's count): `epochs_consumed` of `jobs.tune.run`, the results Tune took in. Epochs trained: "
        "the last epoch each trial's Ray Train run checkpointed, summed (a trial that ASHA stops trains on "
        "until it is killed).", "",
        f"Goal (ASHA's best objective within {AUROC_GOAL} AUROC points of FIFO's, with at most "
        f"{100 * EPOCH_GOAL:.0f}% of its epochs trained): epochs {100 * ratio_trained:.1f}% "
        f"({'met' if ok_epochs else 'NOT met'}), best objective {diff:+.2f} points "
        f"({'met' if ok_auroc else 'NOT met'}): {'met' if ok_epochs and ok_auroc else 'NOT met'}.",
    ]
    for name, arm in (("FIFO", f), ("ASHA", a)):
        if arm["rebuilt"]:
            lines.append(f"Warning: the {name} arm rebuilt {', '.join(arm['rebuilt'])}; its wall time includes them.")
    lines += ["", f"Runtime: {time.perf_counter() - t0:.0f} s, of which {prep:.0f} s the shared stages.", ""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
