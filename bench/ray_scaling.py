"""Ray scaling: synthesis actors 1 vs 2, Ray Train vs the single-process loop, evaluation and embeddings on 1 vs 2
Ray workers, and job start-up latency.

    . .stack/env && python -m bench.ray_scaling [--quick] [--synth-reps 2] [--train-reps 2] [--epochs 6]
        [--shard-reps 2] [--train-per-class 2000] [--skip synthesis training sharded job]

Needs a running Ray head (token auth), e.g. `python -m cluster.stack up --services ray && . .stack/env`.
Everything runs against that head, from one driver process, and prints two Markdown tables (the parallel measures,
1 and 3, in the second):

The ceiling (1 and 3). On a 2-core machine two busy processes each run ~12% slower than one alone, so a raw 1 vs 2
ratio cannot reach 2x, nor reliably 1.7x. Each parallel figure is therefore shown next to its ceiling, measured in
the same run: two plain processes (spawned once, no Ray, 1 torch thread and OMP_NUM_THREADS=1 each, as a 1-CPU Ray
worker, and at the niceness Ray gives its workers, 15 by default) computing the same two halves of the same work at
the same time, with the same library function the Ray task calls, against one plain process computing the whole.
Their untimed set-up (loading the data set or the model, once per process, kept for later runs) comes first; the
timed span runs from the first process's start to the last one's end. The parallel efficiency = Ray's ratio / the
ceiling: what Ray's path adds beyond the machine's own limit (task start, loading data and network in each task,
handing results over, the merging task).
The Ray runs and the plain runs are interleaved ABBA: Ray 1, Ray 2, plain 1, plain 2, then the reverse.

1. Latent synthesis throughput (outliers/s) of `jobs.synthesize.run_pool` with 1 actor and with 2 actors
   (1 CPU each), the same shards and settings, built-in tiny diffusion model. Each run starts its actors
   and waits until each has loaded the model (timed apart: the start-up), then times `run_pool` on that
   warm pool (the scaling figure: the work queue over the actors). End to end (both) is shown too: on this
   small workload the fixed start-up of a few seconds weighs on it. The ceiling: `LatentSynthesizer.run`
   (what an actor's `run` calls) over the same shards, every other shard to each of the two plain processes,
   the model built before timing (as the warm pool's). One untimed warm-up run of each, then ABBA; medians.
   Goal: the raw ratio (2 actors' throughput over 1's) >= 1.7x.
2. Steady-state step time of the student (MICL and KD off: plain CE through `oal.train.fit`) on Ray Train
   (1 worker, 1 CPU) against `oal.stages.train_stage` in this process with 1 torch thread (what a 1-CPU
   Ray worker gets). Step time = an epoch's `epoch_seconds` over its steps, the first epoch of each run
   left out as warm-up. Runs ABBA (single, ray, ray, single, ...); medians over all steady-state epochs.
3. Seconds of the evaluation of one checkpoint (`jobs.common.evaluate_on_workers`) and of the embeddings stage
   (the registry's embeddings stage on `jobs.common.Workers`) with `cluster.shards` 1 and 2 (1 CPU each) on fashion with
   `--train-per-class` training images per class (default all 6,000), the teacher at 64 px: from the driver's
   call to the manifest, shard tasks (each loads the data and the network) and the merging task included. The
   checkpoints (base student and teacher, one epoch each) are trained once first; weights do not change the
   work. The ceiling: `oal.stages.eval_shard` / `embeddings_shard` (what each shard task runs) on the same
   slices, `shard=(i, n)`, with the same config and checkpoints, the data set loaded before timing (so the
   tasks' own loading counts as Ray's), the checkpoint loaded in the timed call as in the task; no merging.
   One untimed warm-up of 2 workers and of 2 plain processes, then ABBA; medians. Goal: parallel efficiency
   >= 0.9 (the raw ratio is shown too); not judged where the ceiling is under 1.5x (other work held the cores).
4. Seconds from `JobSubmissionClient.submit_job` of the digits pipeline (quick overrides) to the teacher's
   first Ray Train report (its first `checkpoint_*` folder, or its "epoch 1/" log line); that minus the
   first epoch's own seconds bounds the time to the first training step from above. The job is then
   stopped. MLflow is off in that job: it measures Ray's start-up, not a tracking server's.

On a 2-core machine that other work shares, only the ratios measured in the same run mean much.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from oal import config as C

REPO = Path(__file__).resolve().parent.parent
SYNTH_GOAL = 1.7  # the target: 2 actors at least 1.7x the throughput of 1 on this 2-core machine
# The target for evaluation and embeddings: 2 Ray workers at least 90% of the speed-up that 2 plain processes
# get on the same halves of the work (a raw 1.7x is out of reach where 2 busy processes each run ~12% slower).
SHARD_GOAL = 0.9
# Below this ceiling the 2 plain processes did not get 2 cores' worth (other work held them): no efficiency is judged.
MIN_CEILING = 1.5
TEACHER_PX = 64  # the sharded stages' teacher input side (see shard_cfg)
TRAIN_GOAL = 0.05  # the target: Ray Train at most 5% slower per step than the single-process loop
START_HELP = ("start one with `python -m cluster.stack up --services ray` and load its client environment "
              "with `. .stack/env` (RAY_ADDRESS, RAY_API_SERVER_ADDRESS, RAY_AUTH_MODE=token)")
# What a submitted job must not upload (on top of cluster/runtime_env.yaml's list).
EXCLUDES = [".venv", ".git", "runs", ".stack", "*.pt", "docs"]
# The student with no teacher and no outliers: nothing but the training loop, no upstream stage files.
STUDENT_PLAIN = ("loss.w_logit_kd=0", "loss.w_feat_kd=0", "loss.w_micl_knn=0", "loss.w_micl_lat=0")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def connect() -> dict[str, float]:
    """Join the running head (never start one: a head started here would die with this process)."""
    import ray

    from jobs import common

    common.connect(log_to_driver=False)
    return ray.cluster_resources()


# ---------------------------------------------------------------- the ceiling: plain processes, no Ray


def _plain_worker(conn: Any, niceness: int) -> None:
    """A plain process (no Ray) with 1 torch thread and a Ray worker's niceness, what a 1-CPU Ray worker gets: per
    job, `setup` once per key (untimed; kept for later jobs), then, on "go", `run(state, *args)` timed by its own
    monotonic clock."""
    torch.set_num_threads(1)
    os.nice(niceness - os.nice(0))
    state: dict[str, Any] = {}
    while True:
        job = conn.recv()
        if job is None:
            return
        key, setup, setup_args, run, args = job
        try:
            if key not in state:
                state[key] = setup(*setup_args)
            conn.send("ready")
            conn.recv()  # "go": every process of this run starts together
            t0 = time.monotonic()
            run(state[key], *args)
            conn.send((t0, time.monotonic()))
        except BaseException as e:
            conn.send(e)
            raise


class PlainPool:
    """Two plain processes (spawned, 1 torch thread each, OMP_NUM_THREADS=1, at `niceness`; no Ray): the ceiling
    that 2 busy processes reach on this machine. `run(jobs)` gives job i to process i, starts them together once
    each has done its untimed setup, and returns the seconds from the first start to the last end."""

    def __init__(self, size: int, niceness: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # not fork: this process holds Ray's threads and sockets
        self.conns, self.procs = [], []
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # as Ray sets it for a 1-CPU worker; inherited at spawn
        try:
            for _ in range(size):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=_plain_worker, args=(theirs, niceness), daemon=True)
                proc.start()
                self.conns.append(ours)
                self.procs.append(proc)
        finally:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = old

    def run(self, jobs: list[tuple[str, Callable[..., Any], tuple, Callable[..., Any], tuple]]) -> float:
        conns = self.conns[:len(jobs)]
        for conn, job in zip(conns, jobs):
            conn.send(job)
        for conn in conns:
            _plain_reply(conn.recv())
        for conn in conns:
            conn.send("go")
        spans = [_plain_reply(conn.recv()) for conn in conns]
        return max(b for _, b in spans) - min(a for a, _ in spans)

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:  # that process has already ended (it failed)
                pass
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


def _plain_reply(reply: Any) -> Any:
    if isinstance(reply, BaseException):
        raise RuntimeError("a plain (ceiling) process failed") from reply
    return reply


def _niceness() -> int:
    return os.nice(0)


def ray_niceness() -> int:
    """The niceness of the head's worker processes (Ray starts them at RAY_worker_niceness, 15 by default): where
    other work shares the cores, a plain process at 0 would get more of them than a Ray worker does."""
    import ray

    return int(ray.get(ray.remote(num_cpus=1)(_niceness).remote()))


# ---------------------------------------------------------------- 1. synthesis actors


# One ABBA round of the parallel measures: Ray on 1 and 2 workers, plain processes (the ceiling) on 1 and 2; the
# next round runs them in the reverse order.
SETTINGS = (("ray", 1), ("ray", 2), ("plain", 1), ("plain", 2))


def synth_cfg(actors: int, steps: int, num_outliers: int, shard: int, batch: int) -> C.OALConfig:
    return C.load_config("digits", [f"diffusion.steps={steps}", f"diffusion.num_outliers={num_outliers}",
                                    f"diffusion.shard_size={shard}", f"diffusion.batch_size={batch}",
                                    "diffusion.grid_samples=0", f"cluster.synth_actors={actors}",
                                    "cluster.synth_cpus_per_actor=1", "cluster.use_gpu=false"])


def synth_once(cfg: C.OALConfig, actors: int, class_names: list[str], outliers: torch.Tensor) -> tuple[float, float]:
    """(start-up s, sampling s) of one synthesis run into a fresh folder: the actors are started and waited
    for (each loads the model), then `run_pool` is timed on that warm pool."""
    from jobs.synthesize import ActorPool, run_pool

    with tempfile.TemporaryDirectory(prefix="bench-ray-synth-") as d:
        t0 = time.perf_counter()
        pool = ActorPool(cfg, class_names, outliers, actors)
        try:
            pool.wait_ready()
            t1 = time.perf_counter()
            manifest = run_pool(cfg, Path(d), class_names, outliers, "bench", progress=False, pool=pool)
            t2 = time.perf_counter()
        finally:
            pool.shutdown()
    if manifest["count"] != cfg.diffusion.num_outliers:
        raise RuntimeError(f"run_pool returned {manifest['count']} outliers, expected {cfg.diffusion.num_outliers}")
    return t1 - t0, t2 - t1


def _load_synth(diffusion: dict[str, Any], class_names: list[str], outliers: torch.Tensor, seed: int) -> Any:
    """In a plain process: what a SynthActor holds (the sampler with its model), built as the actor builds it."""
    from oal.synthesize import LatentSynthesizer

    return LatentSynthesizer(C.DiffusionConfig(**diffusion), class_names, outliers, "cpu", seed)


def _synth_shards(synth: Any, specs: list[Any]) -> None:
    for spec in specs:
        synth.run(spec)  # what SynthActor.run computes


def measure_synthesis(reps: int, warmup: bool, steps: int, num_outliers: int, shard: int, batch: int,
                      plain: PlainPool) -> dict[str, Any]:
    from oal.data.digits import NAMES
    from oal.synthesize import plan_shards

    class_names = list(NAMES[:6])  # the digits benchmark's ID classes
    gen = torch.Generator().manual_seed(0)
    outliers = torch.randn(len(class_names), 20, 32, generator=gen)  # [C, M, E]: the built-in model's 32-d space
    cfg = synth_cfg(2, steps, num_outliers, shard, batch)
    # The ceiling's work: the same shards, the actors' queue split statically in two (every other shard).
    plan = plan_shards(cfg.diffusion.num_outliers, cfg.diffusion.shard_size, cfg.seed)
    setup = ("synth", _load_synth, (C.to_dict(cfg.diffusion), class_names, outliers, cfg.seed), _synth_shards)

    def plain_once(n: int) -> float:
        return plain.run([(*setup[:3], setup[3], (plan[i::n],)) for i in range(n)])

    if warmup:
        # Untimed: first actor start-up on a fresh head pays worker-pool and page-cache warm-up for both settings.
        log(f"  synthesis warm-up (2 actors): {sum(synth_once(cfg, 2, class_names, outliers)):.1f} s, "
            f"(2 plain processes): {plain_once(2):.1f} s")
    start: dict[int, list[float]] = {1: [], 2: []}
    run: dict[int, list[float]] = {1: [], 2: []}
    bare: dict[int, list[float]] = {1: [], 2: []}
    for r in range(reps):
        for kind, n in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:  # ABBA: drift and noise fall on every setting
            if kind == "plain":
                sec = plain_once(n)
                bare[n].append(sec)
                log(f"  synthesis rep {r + 1}/{reps}, {n} plain process(es): {sec:.1f} s "
                    f"({num_outliers / sec:.2f} outliers/s)")
                continue
            a, b = synth_once(cfg, n, class_names, outliers)
            start[n].append(a)
            run[n].append(b)
            log(f"  synthesis rep {r + 1}/{reps}, {n} actor(s): start-up {a:.1f} s, sampling {b:.1f} s "
                f"({num_outliers / b:.2f} outliers/s warm, {num_outliers / (a + b):.2f} end to end)")
    warm = {n: num_outliers / statistics.median(v) for n, v in run.items()}
    cold = {n: num_outliers / statistics.median([a + b for a, b in zip(start[n], run[n])]) for n in (1, 2)}
    ceil = {n: num_outliers / statistics.median(v) for n, v in bare.items()}
    ratio, ceiling = warm[2] / warm[1], ceil[2] / ceil[1]
    return {"warm": warm, "cold": cold, "ratio": ratio, "cold_ratio": cold[2] / cold[1], "plain": ceil,
            "ceiling": ceiling, "efficiency": ratio / ceiling, "start": {n: statistics.median(v) for n, v in start.items()}}


# ---------------------------------------------------------------- 2. Ray Train vs single process


def train_cfg(out: Path, epochs: int) -> C.OALConfig:
    # checkpoint_every stays at its default (1), as in the pipeline: both paths write one per epoch, untimed.
    cfg = C.load_config("digits", [*STUDENT_PLAIN, f"student.epochs={epochs}", f"output_dir={out}",
                                   "cluster.num_workers=1", "cluster.cpus_per_worker=1", "cluster.use_gpu=false",
                                   "device=cpu",
                                   # Ray's metrics history holds only the reports of kept checkpoints: keep all.
                                   f"cluster.checkpoints_to_keep={epochs}"])
    # Absolute outputs, as jobs/common.py makes them: the Ray worker does not share our working directory.
    return C.from_dict({**C.to_dict(cfg), "output_dir": str(out.resolve())})


def train_single(out: Path, epochs: int) -> tuple[list[dict[str, float]], float]:
    from oal import registry, stages

    cfg = train_cfg(out, epochs)
    t0 = time.perf_counter()
    res = registry.train_stage(cfg, "student", progress=False)
    stages.finish_training(cfg, "student", registry.fingerprint("student", cfg), res.checkpoint, res.history)  # as `oal student`
    wall = time.perf_counter() - t0
    return _manifest_history(cfg), wall


def train_ray(out: Path, epochs: int) -> tuple[list[dict[str, float]], float]:
    from jobs.train import run_stage

    cfg = train_cfg(out, epochs)
    t0 = time.perf_counter()
    run_stage(cfg, "student", progress=False, force=True)
    wall = time.perf_counter() - t0
    return _manifest_history(cfg), wall


def _manifest_history(cfg: C.OALConfig) -> list[dict[str, float]]:
    """Both paths record their per-epoch metrics in the same place: the stage manifest's history."""
    m = json.loads((cfg.run_dir / "student" / "stage.json").read_text())
    return sorted(m["history"], key=lambda h: h["epoch"])


def measure_training(reps: int, epochs: int) -> dict[str, Any]:
    from oal.data import build_benchmark

    cfg = train_cfg(Path(tempfile.gettempdir()), epochs)
    steps = math.ceil(len(build_benchmark(cfg.data).train) / cfg.data.batch_size)  # type: ignore[arg-type]
    runs: dict[str, Callable[[Path, int], tuple[list[dict[str, float]], float]]] = {"single": train_single,
                                                                                   "ray": train_ray}
    per_step: dict[str, list[float]] = {"single": [], "ray": []}
    walls: dict[str, list[float]] = {"single": [], "ray": []}
    for r in range(reps):
        for name in (("single", "ray") if r % 2 == 0 else ("ray", "single")):  # ABBA
            with tempfile.TemporaryDirectory(prefix=f"bench-ray-train-{name}-") as d:  # distinct: nothing skipped
                history, wall = runs[name](Path(d), epochs)
            if len(history) != epochs:
                raise RuntimeError(f"{name} run recorded {len(history)} epochs, expected {epochs}")
            steady = [h["epoch_seconds"] / steps for h in history if int(h["epoch"]) > 1]  # epoch 1 is warm-up
            per_step[name] += steady
            walls[name].append(wall)
            log(f"  training rep {r + 1}/{reps}, {name}: {wall:.1f} s wall, steady step "
                f"{1e3 * statistics.median(steady):.2f} ms")
    med = {k: statistics.median(v) for k, v in per_step.items()}
    return {"step": med, "ratio": med["ray"] / med["single"], "steps": steps, "n": len(per_step["single"]),
            "iqr": {k: _rel_iqr(v) for k, v in per_step.items()},
            "wall": {k: statistics.median(v) for k, v in walls.items()}}


def _rel_iqr(xs: list[float]) -> float:
    """Interquartile range over the median: how much a setting's epochs disagree (the ratio's noise floor)."""
    if len(xs) < 2:
        return float("nan")
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return (q3 - q1) / statistics.median(xs)


# ---------------------------------------------------------------- 3. sharded stages: evaluation, embeddings


def shard_cfg(out: Path, shards: int, train_per_class: int, *more: str) -> C.OALConfig:
    """fashion, 1-CPU workers, `shards` of them for embeddings and evaluation; absolute output folder."""
    # The teacher at 64 px: 4x the pixels of fashion's 32, so that its pass over the data, not the fixed start of
    # each task (loading the dataset and the network, ~1-2 s), is most of what is measured, as with a real teacher.
    return C.load_config("fashion", [f"output_dir={out.resolve()}", "teacher.epochs=1", "base.epochs=1",
                                     f"teacher.image_size={TEACHER_PX}",
                                     f"data.train_per_class={train_per_class}", "eval.plots=false", "device=cpu",
                                     "cluster.cpus_per_worker=1", "cluster.use_gpu=false", f"cluster.shards={shards}",
                                     *more])


def sharded_once(stage: str, out: Path, shards: int, train_per_class: int) -> tuple[float, list[Any]]:
    """(seconds, the stage's shard records) of one run of `stage` over `shards` Ray workers into a fresh folder,
    from the checkpoints `measure_sharded` trained under `out/fashion`."""
    from jobs import common
    from oal import registry

    trained = out / "fashion"
    with tempfile.TemporaryDirectory(prefix=f"bench-ray-{stage}-", dir=out) as d:
        cfg = shard_cfg(out, shards, train_per_class, f"name={Path(d).name}",  # a fresh run: nothing to skip
                        f"teacher.checkpoint={trained / 'teacher' / 'checkpoint.pt'}")
        t0 = time.perf_counter()
        if stage == "evaluation":
            res, _ = common.evaluate_on_workers(cfg, "the evaluation", str(trained / "base" / "checkpoint.pt"),
                                                of="base")
        else:
            res = registry.run(registry.named("embeddings"), cfg, common.Workers())
        seconds = time.perf_counter() - t0
        record = json.loads((res.dir / "stage.json").read_text())
    if res.skipped or len(record["shards"]) != shards:
        raise RuntimeError(f"{stage} with {shards} shard(s) recorded {record.get('shards')}")
    return seconds, record["shards"]


def _load_bench(data: C.DataConfig) -> Any:
    """In a plain process, once before the timed runs: the data set's files read, as arrays (a Ray shard task
    reads them in the task, ~0.4 s for fashion). Each timed half makes its benchmark from them afresh, whose
    images are converted to model input when first read (`oal.data.GreyImages`): each half converts its own
    images in the timed span, as each Ray shard task does."""
    from oal.data import ARRAYS

    if data.benchmark not in ARRAYS:
        raise ValueError(f"the ceiling needs an embedded grey benchmark ({', '.join(sorted(ARRAYS))}), "
                         f"not '{data.benchmark}'")
    return ARRAYS[data.benchmark](data)


def _eval_half(arrays: Any, cfg: C.OALConfig, checkpoint: str, shard: tuple[int, int]) -> None:
    from oal import stages

    bench = arrays.benchmark(cfg.data.image_size)
    stages.eval_shard(cfg, checkpoint, bench, of="base", shard=shard)  # what evaluate_on_workers' shard task runs


def _embeddings_half(arrays: Any, cfg: C.OALConfig, shard: tuple[int, int]) -> None:
    from oal import stages

    stages.embeddings_shard(cfg, arrays.benchmark(cfg.data.image_size), shard=shard)  # as each Ray shard task


def measure_sharded(reps: int, train_per_class: int, plain: PlainPool) -> dict[str, Any]:
    """Evaluation of one checkpoint and the embeddings stage, each on 1 vs 2 Ray workers of 1 CPU (the same
    slices merged: outputs equal), and the same shard functions on the same slices in 1 vs 2 plain processes (the
    ceiling). The checkpoints (a base student and a teacher, one epoch each on 200 fashion images per class) are
    trained once here; their weights do not change the work."""
    from oal import registry, stages
    from oal.data import build_benchmark
    from oal.evaluate import eval_sets

    out = Path(tempfile.mkdtemp(prefix="bench-ray-sharded-"))
    try:
        small = shard_cfg(out, 1, 200)  # the size of the training set does not change the networks' shapes
        for stage in ("base", "teacher"):
            res = registry.train_stage(small, stage, progress=False)
            stages.finish_training(small, stage, registry.fingerprint(stage, small), res.checkpoint, res.history)
        trained = out / "fashion"
        cfg = shard_cfg(out, 1, train_per_class, f"teacher.checkpoint={trained / 'teacher' / 'checkpoint.pt'}")
        bench = build_benchmark(cfg.data)
        images = {"evaluation": sum(len(ds) for ds in eval_sets(bench, cfg.eval).values()),  # type: ignore[arg-type,misc]
                  "embeddings": len(bench.train_plain)}  # type: ignore[arg-type]
        del bench
        halves: dict[str, Callable[[tuple[int, int]], tuple]] = {
            "evaluation": lambda shard: (_eval_half, (cfg, str(trained / "base" / "checkpoint.pt"), shard)),
            "embeddings": lambda shard: (_embeddings_half, (cfg, shard))}
        result: dict[str, Any] = {}
        for stage in ("evaluation", "embeddings"):

            def plain_once(n: int) -> float:
                return plain.run([("bench", _load_bench, (cfg.data,), *halves[stage]((i, n))) for i in range(n)])

            # Untimed warm-up: worker processes, page cache; the plain processes load the data set here.
            log(f"  {stage} warm-up: 2 workers {sharded_once(stage, out, 2, train_per_class)[0]:.1f} s, "
                f"2 plain processes {plain_once(2):.1f} s")
            times: dict[tuple[str, int], list[float]] = {k: [] for k in SETTINGS}
            for r in range(reps):
                for kind, n in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:  # ABBA
                    if kind == "plain":
                        sec = plain_once(n)
                        log(f"  {stage} rep {r + 1}/{reps}, {n} plain process(es): {sec:.1f} s")
                    else:
                        sec, by = sharded_once(stage, out, n, train_per_class)
                        log(f"  {stage} rep {r + 1}/{reps}, {n} worker(s): {sec:.1f} s "
                            f"(shards in pids {sorted({b['pid'] for b in by})})")
                    times[kind, n].append(sec)
            med = {k: statistics.median(v) for k, v in times.items()}
            ratio, ceiling = med["ray", 1] / med["ray", 2], med["plain", 1] / med["plain", 2]
            result[stage] = {"seconds": med, "ratio": ratio, "ceiling": ceiling, "efficiency": ratio / ceiling,
                             "images": images[stage]}
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ---------------------------------------------------------------- 4. job submit -> first step


EPOCH_LINE = re.compile(r"epoch 1/\d+: .*?epoch_seconds=([0-9.eE+-]+)")


def runtime_env() -> dict[str, Any]:
    """cluster/runtime_env.yaml (what `make demo` submits with) plus the brief's excludes; MLflow off."""
    import yaml

    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text()) or {}
    excludes = list(dict.fromkeys([*env.get("excludes", []), *EXCLUDES]))
    # An empty URI disables tracking in the job (Tracker.enabled): the head's environment may name a
    # server that is not running, or someone else's.
    env_vars = {**env.get("env_vars", {}), "MLFLOW_TRACKING_URI": ""}
    return {"working_dir": str(REPO), "excludes": excludes, "env_vars": env_vars}


def measure_job(timeout: float) -> dict[str, Any]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    api = os.environ.get("RAY_API_SERVER_ADDRESS")
    if not api:
        sys.exit(f"RAY_API_SERVER_ADDRESS is not set (the job server's http:// address): {START_HELP}")
    client = JobSubmissionClient(api)  # token from RAY_AUTH_MODE=token and ~/.ray/auth_token
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    out = Path(tempfile.mkdtemp(prefix="bench-ray-job-"))  # absolute: the job runs in an uploaded copy
    entry = "python -m jobs.pipeline --config digits " + " ".join([*C.QUICK_OVERRIDES, f"output_dir={out}"])
    ray_dir = out / "digits" / "ray"  # the teacher's Ray Train storage (cluster.storage_path unset)
    logs, m = "", None
    t0 = time.perf_counter()
    job = client.submit_job(entrypoint=entry, runtime_env=runtime_env())
    try:
        seen, how, next_logs = -1.0, "", 0.0
        while seen < 0:
            now = time.perf_counter() - t0
            if now > timeout:
                raise RuntimeError(f"no teacher report within {timeout:.0f} s; job logs:\n{logs[-3000:]}")
            # A checkpoint folder is the cheapest signal (a stat per poll); the log line is the fallback.
            if ray_dir.is_dir() and any(ray_dir.glob("*/checkpoint_*")):
                seen, how = now, "checkpoint_* folder"
            elif now >= next_logs:
                next_logs = now + 1.0  # the job API costs more to ask: once a second
                logs = client.get_job_logs(job)
                if EPOCH_LINE.search(logs):
                    seen, how = time.perf_counter() - t0, "epoch 1 log line"
                elif client.get_job_status(job) in terminal:
                    raise RuntimeError(f"job {job} ended before its first report:\n{logs[-3000:]}")
            time.sleep(0.1)
        # The epoch line (it carries epoch 1's own seconds) may trail the checkpoint: let the log catch up.
        deadline = time.perf_counter() + 15
        while m is None and time.perf_counter() < deadline:
            m = EPOCH_LINE.search(client.get_job_logs(job))
            if m is None:
                time.sleep(0.5)
    finally:
        client.stop_job(job)  # the rest of the pipeline is not measured
        deadline = time.perf_counter() + 60
        while client.get_job_status(job) not in terminal and time.perf_counter() < deadline:
            time.sleep(0.5)
        shutil.rmtree(out, ignore_errors=True)
    epoch1 = float(m.group(1)) if m else float("nan")
    return {"first_report": seen, "how": how, "epoch1": epoch1, "first_step_bound": seen - epoch1, "job": job}


# ---------------------------------------------------------------- main


def _verdict(m: dict[str, Any]) -> str:
    if m["ceiling"] < MIN_CEILING:
        return f"not judged: ceiling < {MIN_CEILING}x, 2 cores were not free"
    return "met" if m["efficiency"] >= SHARD_GOAL else "NOT met"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ray_scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a fast smoke run (tiny sizes, one rep, no warm-up)")
    p.add_argument("--synth-reps", type=int, default=2, help="ABBA rounds of 1- and 2-actor synthesis")
    p.add_argument("--steps", type=int, default=20, help="diffusion denoising steps")
    p.add_argument("--num-outliers", type=int, default=48, help="latent outliers per synthesis run")
    p.add_argument("--shard-size", type=int, default=6, help="outliers per shard (the unit of work)")
    p.add_argument("--batch-size", type=int, default=6, help="samples per sampler call")
    p.add_argument("--train-reps", type=int, default=2, help="ABBA rounds of single-process and Ray Train runs")
    p.add_argument("--epochs", type=int, default=6, help="student epochs per training run; the first is warm-up")
    p.add_argument("--job-timeout", type=float, default=300, help="seconds to wait for the job's first report")
    p.add_argument("--shard-reps", type=int, default=2, help="ABBA rounds of 1- and 2-worker evaluation and embeddings")
    p.add_argument("--train-per-class", type=int, default=6000,
                   help="fashion training images per ID class for the sharded stages (of 6,000)")
    p.add_argument("--skip", nargs="*", default=[], choices=("synthesis", "training", "sharded", "job"),
                   help="parts to leave out")
    args = p.parse_args(argv)
    if args.quick:
        args.synth_reps, args.steps, args.num_outliers, args.train_reps, args.epochs = 1, 4, 12, 1, 3
        args.shard_reps, args.train_per_class = 1, 200
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is warm-up)")
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(1)  # the single-process loop gets what a 1-CPU Ray worker gets (OMP_NUM_THREADS=1)
    resources = connect()
    cpus = int(resources.get("CPU", 0))
    if cpus < 2:
        log(f"warning: the head has {cpus} CPU(s); 2 synthesis actors of 1 CPU each cannot run at once")
    t0 = time.perf_counter()
    syn = tr = sh = job = None
    plain = PlainPool(2, ray_niceness()) if {"synthesis", "sharded"} - set(args.skip) else None
    try:
        if plain and "synthesis" not in args.skip:
            log("1. synthesis throughput, 1 vs 2 actors, and 1 vs 2 plain processes (the ceiling)")
            syn = measure_synthesis(args.synth_reps, not args.quick, args.steps, args.num_outliers, args.shard_size,
                                    args.batch_size, plain)
        if "training" not in args.skip:
            log("2. student step time, Ray Train (1 worker) vs single process")
            tr = measure_training(args.train_reps, args.epochs)
        if plain and "sharded" not in args.skip:
            log("3. evaluation and embeddings, 1 vs 2 Ray workers, and 1 vs 2 plain processes (the ceiling)")
            sh = measure_sharded(args.shard_reps, args.train_per_class, plain)
    finally:
        if plain:
            plain.close()
    if "job" not in args.skip:
        log("4. ray job submit -> first teacher report")
        job = measure_job(args.job_timeout)

    lines = [
        "# Ray scaling", "",
        f"Ray head: {cpus} CPUs{' (--quick)' if args.quick else ''}. Medians; runs interleaved ABBA.", "",
        "| measure | baseline | Ray | ratio | goal |",
        "|---|---|---|---|---|",
    ]
    if syn:
        lines.append(f"| synthesis end to end incl. actor start-up ({syn['start'][1]:.1f} s, {syn['start'][2]:.1f} s), "
                     f"outliers/s | 1 actor: {syn['cold'][1]:.2f} | 2 actors: {syn['cold'][2]:.2f} | "
                     f"{syn['cold_ratio']:.2f}x | (for context) |")
    if tr:
        r = tr["ratio"]
        lines.append(f"| student step, ms ({tr['steps']} steps/epoch, {tr['n']} steady epochs each; IQR/median "
                     f"{100 * tr['iqr']['single']:.0f}%, {100 * tr['iqr']['ray']:.0f}%) | single process: "
                     f"{1e3 * tr['step']['single']:.2f} | Ray Train 1 worker: {1e3 * tr['step']['ray']:.2f} | "
                     f"{r:.3f} ({100 * (r - 1):+.1f}%) | <= +{100 * TRAIN_GOAL:.0f}%: "
                     f"{'met' if r - 1 <= TRAIN_GOAL else 'NOT met'} |")
        w = tr["wall"]
        lines.append(f"| student run wall, s ({args.epochs} epochs incl. start-up and validation) | "
                     f"{w['single']:.1f} | {w['ray']:.1f} | {w['ray'] / w['single']:.2f} | (for context) |")
    if job:
        lines.append(f"| submit -> teacher's first report, s (seen as {job['how']}) | | {job['first_report']:.1f} "
                     f"| | |")
        lines.append(f"| submit -> first training step, s (upper bound: the above minus epoch 1's "
                     f"{job['epoch1']:.1f} s) | | {job['first_step_bound']:.1f} | | |")
    if lines[-1] == "|---|---|---|---|---|":  # no rows: only the parallel measures ran
        del lines[-3:]
    if syn or sh:
        lines += ["", "Parallel scaling, 1 vs 2: Ray's ratio (1-worker time over 2-worker time; for synthesis the "
                  "throughput ratio) against the ceiling, the same ratio of plain processes (no Ray, 1 torch thread "
                  "each) computing the same halves with the same library functions in the same run; efficiency = "
                  "ratio / ceiling.", "",
                  "| measure | Ray, 1 / 2 workers | ratio | plain, 1 / 2 processes | ceiling | efficiency | goal |",
                  "|---|---|---|---|---|---|---|"]
    if syn:
        r = syn["ratio"]
        what = f"{args.num_outliers} outliers, {args.steps} steps, shards of {args.shard_size}, {args.synth_reps} runs each"
        lines.append(f"| synthesis throughput, warm pool, outliers/s ({what}) | {syn['warm'][1]:.2f} / "
                     f"{syn['warm'][2]:.2f} | {r:.2f}x | {syn['plain'][1]:.2f} / {syn['plain'][2]:.2f} | "
                     f"{syn['ceiling']:.2f}x | {syn['efficiency']:.2f} | ratio >= {SYNTH_GOAL}x: "
                     f"{'met' if r >= SYNTH_GOAL else 'NOT met'} |")
    if sh:
        for stage, what in (("evaluation", "base student's checkpoint on the ID test, ID train (KNN score) and 5 OOD "
                                           "sets"), ("embeddings", f"teacher at {TEACHER_PX} px over the ID training set")):
            m = sh[stage]
            sec = m["seconds"]
            lines.append(f"| {stage}, s (fashion, {what}: {m['images']:,} images; {args.shard_reps} runs each) | "
                         f"{sec['ray', 1]:.1f} / {sec['ray', 2]:.1f} | {m['ratio']:.2f}x | {sec['plain', 1]:.1f} / "
                         f"{sec['plain', 2]:.1f} | {m['ceiling']:.2f}x | {m['efficiency']:.2f} | efficiency >= "
                         f"{SHARD_GOAL}: {_verdict(m)} |")
    lines += ["", f"Runtime: {time.perf_counter() - t0:.0f} s.", ""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
