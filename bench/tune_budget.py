"""Search budget: ASHA vs full-budget random search over the loss weights (jobs/tune.py), on `digits`.

    . .stack/env && python -m bench.tune_budget [--quick] [--trials 16] [--epochs 20] [--seed 0] [--out DIR]
    python -m bench.tune_budget --replay-only --out DIR [--grace 1] [--reduction 4]

Needs a running Ray head (token auth), e.g. `python -m cluster.stack up --services ray && . .stack/env`.
Both arms call `jobs.tune.run` on the same preset, seed, random searcher and number of trials, so the
seeded searcher draws the same weight settings in both and the arms differ only in the scheduler:
FIFO (every trial trains all `student.epochs`) against ASHA (`max_t` = those epochs, grace period and
reduction factor from the flags). Printed side by side, one Markdown table: epochs in two counts, Tune's
(`epochs_consumed`: the sum over trials of their last reported epoch, as `jobs.tune.summarize` counts it)
and the epochs trained (the newest epoch in each trial's Ray Train checkpoints: a trial that ASHA stops
trains on until Tune kills it, so Tune's count is low); the best trial's validation objective
(the validation OOD AUROC, less 1 when the trial lost too much ID accuracy), its validation OOD AUROC and ID
accuracy, all at its last epoch as `jobs.tune.summarize` ranks trials, and the search's wall time; then the ratios
against the issue's goal: ASHA's best objective within 0.5 AUROC points of FIFO's, using at most 35% of
FIFO's epochs (judged on the epochs trained).

One real ASHA run is one draw: its decisions depend on which trials start first and report first. So the
benchmark then replays Ray's own `ASHAScheduler` over the FIFO arm's recorded per-epoch results (every trial
trains the same in both arms) in `--replay-orders` random start orders and epoch times, and prints how the
epochs used and the best objective spread, and in how many orders the goal holds. `--replay-only --out DIR`
replays a kept earlier run with other ASHA flags, in seconds and without Ray.

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

    full = pipeline.prepare(jtune.every_term(cfg), Tracker(None), {}, progress=False)
    jtune.baseline_accuracy(full, progress=False)


def manifests(out: Path) -> dict[Path, float]:
    """Shared stages' manifests and their mtimes (each trial writes its own in its folder, left out): a shared
    stage rebuilt inside an arm would inflate its wall time."""
    return {p: p.stat().st_mtime for p in out.glob("*/*/stage.json") if "-trial-" not in p.parent.parent.name}


def trained_epochs(cfg: C.OALConfig, trial: str) -> int:
    """Epochs a trial's Ray Train run finished: the newest epoch among its kept checkpoints (one per epoch).
    Tune counts only the results it took in; a trial that ASHA stops goes on training until it is killed."""
    from jobs import tune as jtune
    from oal.storage import load_torch
    from oal.train import CHECKPOINT

    name = jtune.trial_name(cfg, trial)
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


def arm_trials(cfg: C.OALConfig, scheduler: str) -> list[str]:
    """Trial ids of an arm, from the copy of its trials table that `run_arm` keeps."""
    table = (cfg.run_dir / "tune" / f"trials-{scheduler}.md").read_text().splitlines()
    return [ln.split("|")[1].strip() for ln in table if ln.startswith("| ") and not ln.startswith("| trial ")]


def replay(cfg: C.OALConfig, trials: list[str], orders: int, seed: int, subset: int | None = None) -> dict[str, Any]:
    """ASHA replayed over the FIFO arm's recorded per-epoch results: Ray's own `ASHAScheduler` (this config's
    grace period and reduction factor) decides on each result, as in a search where every trial trains as it
    did under FIFO. One real ASHA run is one draw of the order in which trials start and report; here the
    start order is shuffled and each trial's epoch time (its measured mean) scaled by a random factor in
    [0.85, 1.15], `orders` times, with `search.max_concurrent` trials at once. Returns the spread of the epochs
    used and of the best objective's distance from FIFO's, and how often the issue's goal holds. With `subset`,
    each order searches a random `subset` of the trials instead (FIFO's best is then that subset's)."""
    import heapq
    from types import SimpleNamespace

    import numpy as np
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from jobs import tune as jtune
    from jobs.train import with_objective
    from oal import stages

    def trial(trial_id: str) -> Any:  # all the scheduler reads of a trial
        return SimpleNamespace(trial_id=trial_id)

    def history(run: C.OALConfig, what: str) -> list[dict]:
        m = stages.read_manifest(stages.stage_dir(run, "student"))
        if m is None or len(m["history"]) != cfg.student.epochs:
            raise SystemExit(f"replay: {what} under {cfg.run_dir.parent} has no full history")
        return list(m["history"])

    base = history(jtune.baseline_config(cfg), "the baseline")
    hist = {t: history(replace(cfg, name=jtune.trial_name(cfg, t)), f"trial {t}") for t in trials}
    objective = jtune.objective_spec(cfg.search, float(base[-1]["val/id_accuracy"]))
    obj = {t: [with_objective(r, objective)["objective"] for r in h] for t, h in hist.items()}
    epoch_s = {t: float(np.mean([r["epoch_seconds"] for r in h])) for t, h in hist.items()}
    rng = np.random.default_rng(seed)
    k = subset or len(trials)
    if not 0 < k <= len(trials):
        raise SystemExit(f"replay: --replay-trials is {k}; expected 1 to the {len(trials)} trials of the FIFO arm")
    fractions, gaps = [], []
    for _ in range(orders):
        drawn = [trials[i] for i in rng.permutation(len(trials))[:k]]
        fifo_best = max(obj[t][-1] for t in drawn)
        sched = ASHAScheduler(time_attr="training_iteration", metric="objective", mode="max",
                              max_t=cfg.student.epochs, grace_period=cfg.search.grace_period,
                              reduction_factor=cfg.search.reduction_factor)
        waiting = list(drawn)  # in a random order
        speed = {t: epoch_s[t] * rng.uniform(0.85, 1.15) for t in drawn}
        events: list[tuple[float, str, int]] = []  # (time of the result, trial, epoch)
        last: dict[str, tuple[int, float]] = {}

        def start(now: float) -> None:
            t = waiting.pop(0)
            sched.on_trial_add(None, trial(t))  # type: ignore[arg-type]
            heapq.heappush(events, (now + speed[t], t, 1))

        for _ in range(min(cfg.search.max_concurrent, len(waiting))):
            start(0.0)
        while events:
            now, t, e = heapq.heappop(events)
            last[t] = (e, obj[t][e - 1])
            action = sched.on_trial_result(None, trial(t),  # type: ignore[arg-type]
                                           {"training_iteration": e, "objective": obj[t][e - 1]})
            if action == TrialScheduler.STOP or e == cfg.student.epochs:
                if waiting:
                    start(now)
            else:
                heapq.heappush(events, (now + speed[t], t, e + 1))
        fractions.append(sum(e for e, _ in last.values()) / (cfg.student.epochs * k))
        gaps.append(100 * (max(o for _, o in last.values()) - fifo_best))
    f, g = np.array(fractions), np.array(gaps)
    return {"orders": orders, "trials": k, "fifo_best": fifo_best,  # the last order's (all: every order's)
            "fraction_mean": float(f.mean()), "fraction_p10": float(np.quantile(f, 0.1)),
            "fraction_p90": float(np.quantile(f, 0.9)), "gap_mean": float(g.mean()), "gap_median": float(np.median(g)),
            "p_epochs": float((f <= EPOCH_GOAL).mean()), "p_auroc": float((g >= -AUROC_GOAL).mean()),
            "p_goal": float(((f <= EPOCH_GOAL) & (g >= -AUROC_GOAL)).mean())}


def replay_lines(r: dict[str, Any], cfg: C.OALConfig, arm_size: int) -> list[str]:
    s = cfg.search
    picked = "" if r["trials"] == arm_size else f", each a random {r['trials']} of its {arm_size} trials"
    return [f"Replay of ASHA over FIFO's results: Ray's ASHAScheduler (grace {s.grace_period}, reduction factor "
            f"{s.reduction_factor:g}, {s.max_concurrent} at once) over the FIFO arm's recorded per-epoch results, "
            f"{r['orders']} random start orders and epoch times{picked}: epochs {100 * r['fraction_mean']:.1f}% on "
            f"average (10-90%: {100 * r['fraction_p10']:.1f}-{100 * r['fraction_p90']:.1f}%), best objective "
            f"{r['gap_mean']:+.2f} points on average (median {r['gap_median']:+.2f}); the goal holds in "
            f"{100 * r['p_goal']:.0f}% of the orders (epochs: {100 * r['p_epochs']:.0f}%, AUROC: "
            f"{100 * r['p_auroc']:.0f}%).", ""]


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
    p.add_argument("--replay-orders", type=int, default=500,
                   help="start orders for the replay of ASHA over FIFO's results (0: no replay)")
    p.add_argument("--replay-trials", type=int, default=None,
                   help="each replayed search draws this many of the FIFO arm's trials (default: all of them)")
    p.add_argument("--replay-only", action="store_true",
                   help="no search: replay ASHA over the FIFO arm kept in --out by an earlier run")
    p.add_argument("overrides", nargs="*", help="more dotted overrides for both arms, e.g. teacher.epochs=10")
    args = p.parse_args(argv)
    args.trials = args.trials or (4 if args.quick else 16)
    args.epochs = args.epochs or (3 if args.quick else 20)
    if args.replay_only:
        if args.out is None:
            p.error("--replay-only needs --out: the folder of an earlier run")
        cfg = arm_config(args.out.resolve(), "asha", args)
        trials = arm_trials(cfg, "fifo")
        r = replay(cfg, trials, args.replay_orders, args.seed, args.replay_trials)
        print("\n".join(replay_lines(r, cfg, len(trials))))
        return
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
        replayed = (replay(cfgs["asha"], [t["trial"] for t in arms["fifo"]["summary"]["trials"]], args.replay_orders,
                           args.seed, args.replay_trials) if args.replay_orders > 0 else None)  # before the folder goes
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
    lines.append("")
    if replayed is not None:
        lines += replay_lines(replayed, cfgs["asha"], len(f["summary"]["trials"]))
    lines += [f"Runtime: {time.perf_counter() - t0:.0f} s, of which {prep:.0f} s the shared stages.", ""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
