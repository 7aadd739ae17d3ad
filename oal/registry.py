"""The stage contract: a stage is a value (`Stage`), the pipeline one tuple of them in dependency order
(`STAGES`), and `run` does what every stage shares, once: its folder and fingerprint, the skip when its outputs
are up to date, then the work, by an executor.

How a stage computes is declared (`Stage.runs`), not written out by each caller:

- ``training``: a network trained by `oal.stages.train_stage` under its name (in-process; Ray Train in `jobs`);
- ``sharded``: `work` gives a shard function (the stage's outputs on one contiguous slice) and a finish function
  (the slices' results merged in order, written, manifest last); in-process one slice, on Ray one task per slice;
- ``whole``: `work` gives one function that computes and records the stage (in-process; one Ray task in `jobs`);
- ``actors``: the latent synthesis (`oal.synthesize`; the actor pool in `jobs.synthesize`).

An executor turns a stage into its `StageResult` (`Executor.compute`); `Local` here runs everything in this
process (the library never imports Ray), `jobs.pipeline.RayExecutor` on a Ray cluster. Adding a stage: its
functions in a module of `oal`, one `Stage` in `STAGES` at its place in the order; the pipelines (`oal pipeline`,
`jobs.pipeline`, `jobs.tune`) iterate `plan(cfg)`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from oal import config as C
from oal import stages as S
from oal.data import Benchmark

# what a sharded stage's `work` gives: the shard function (shard=(i, n) -> part) and the finish (parts -> result)
ShardedWork = tuple[Callable[..., Any], Callable[[list[Any]], S.StageResult]]


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    name:    the stage, its output folder under the run, and its MLflow run name.
    runs:    how it computes: training | sharded | whole | actors (module docstring).
    target:  cfg -> (folder, fingerprint): what `run` checks before any work.
    needed:  cfg -> whether this config's pipeline runs it.
    work:    (cfg, fingerprint, benchmark or None) -> the functions that compute it (sharded: ShardedWork; whole: one
             function of no argument). Each is picklable (module-level functions, partials of them): a Ray task
             runs it. A benchmark given is the one this process built (in-process); None: each task builds its own.
    inputs:  (cfg, the results so far) -> the config with what earlier stages wrote filled in, for this stage and
             those after it (the student's outlier files).
    """

    name: str
    runs: str
    target: Callable[[C.OALConfig], tuple[Path, str]]
    needed: Callable[[C.OALConfig], bool] = lambda cfg: True
    work: Callable[[C.OALConfig, str, Benchmark | None], Any] | None = None
    inputs: Callable[[C.OALConfig, dict[str, S.StageResult]], C.OALConfig] | None = None

    def __post_init__(self) -> None:
        if self.runs not in RUNS:
            raise ValueError(f"stage {self.name}: runs={self.runs!r}; expected one of {', '.join(RUNS)}")
        if self.runs in ("sharded", "whole") and self.work is None:
            raise ValueError(f"stage {self.name} runs {self.runs} and declares no work: give work=(cfg, fingerprint, "
                             f"benchmark) -> " + ("(shard function, finish function)" if self.runs == "sharded" else
                                                  "the function that computes it"))


RUNS = ("training", "sharded", "whole", "actors")  # how a stage computes (module docstring)


class Executor(Protocol):
    def compute(self, stage: Stage, cfg: C.OALConfig, fp: str, force: bool) -> S.StageResult:
        """The stage computed and recorded (its manifest written last); `fp` is `stage.target(cfg)`'s fingerprint."""
        ...


def run(stage: Stage, cfg: C.OALConfig, executor: Executor, force: bool = False) -> S.StageResult:
    """The one skip check: `stage` skipped when its manifest matches its fingerprint and its outputs are whole
    (`oal.stages.is_done`), else computed by `executor` (with `force`: computed again whatever its manifest says)."""
    d, fp = stage.target(cfg)
    if not force and S.is_done(d, fp):
        return S.skipped(stage.name, d, fp)
    return executor.compute(stage, cfg, fp, force)


# ---- the stages' targets and work ----------------------------------------------------------------------------


def _at(name: str, fp_of: Callable[[C.OALConfig], str]) -> Callable[[C.OALConfig], tuple[Path, str]]:
    """A stage's target: its folder under the run, and `fp_of(cfg)`."""
    return lambda cfg: (S.stage_dir(cfg, name), fp_of(cfg))


def _trained(name: str) -> Callable[[C.OALConfig], tuple[Path, str]]:
    return _at(name, functools.partial(S.training_fp, stage=name))


def _needs_outliers(cfg: C.OALConfig) -> bool:
    return any(S.outlier_stages(cfg))


def _embeddings(cfg: C.OALConfig, fp: str, bench: Benchmark | None) -> ShardedWork:
    return (functools.partial(S.embeddings_shard, cfg, bench), functools.partial(S.finish_embeddings, cfg, fp))


def _knn(cfg: C.OALConfig, fp: str, bench: Benchmark | None) -> ShardedWork:
    return functools.partial(S.knn_shard, cfg), functools.partial(S.finish_knn, cfg, fp)


def _anchors(cfg: C.OALConfig, fp: str, bench: Benchmark | None) -> Callable[[], S.StageResult]:
    return functools.partial(S.compute_anchors, cfg, fp)


def _detector(cfg: C.OALConfig, fp: str, bench: Benchmark | None) -> Callable[[], S.StageResult]:
    return functools.partial(S.compute_detector, cfg, fp, bench)


def _eval_checkpoint(cfg: C.OALConfig, of: str) -> str:
    return str(S.base_checkpoint(cfg) if of == "base" else S.stage_dir(cfg, of) / S.CHECKPOINT)


def evaluation(of: str, checkpoint: str | None = None, out_dir: Path | None = None) -> Stage:
    """The evaluation of the `of` stage's checkpoint (student or base; `checkpoint` instead, when given) into its
    folder (`out_dir` instead, when given): sharded over the data sets it scores. Its result's `report` is the
    EvalReport (when computed)."""
    name = S.EVAL_DIRS[of]

    def target(cfg: C.OALConfig) -> tuple[Path, str]:
        _, _, d, fp = S.eval_target(cfg, checkpoint or _eval_checkpoint(cfg, of), out_dir, of)
        return d, fp

    def work(cfg: C.OALConfig, fp: str, bench: Benchmark | None) -> ShardedWork:
        ckpt = checkpoint or _eval_checkpoint(cfg, of)
        target = (Path(ckpt), name, out_dir or S.stage_dir(cfg, name), fp)  # what S.eval_target gives
        return (functools.partial(S.eval_shard, cfg, ckpt, bench, of),
                functools.partial(S.finish_evaluation, cfg, target))

    needed = (lambda cfg: cfg.eval.baseline) if of == "base" else (lambda cfg: True)
    return Stage(name, "sharded", target, needed, work)


STAGES: tuple[Stage, ...] = (
    Stage("base", "training", _trained("base"), S.needs_base),
    Stage("teacher", "training", _trained("teacher")),
    Stage("diffusion", "training", _trained("diffusion"), S.needs_diffusion),
    Stage("embeddings", "sharded", _at("embeddings", S.embeddings_fp),
          _needs_outliers, _embeddings),
    Stage("anchors", "whole", _at("anchors", S.anchors_fp), _needs_outliers,
          _anchors),
    Stage("knn", "sharded", _at("knn", S.knn_fp), _needs_outliers, _knn),
    Stage("latents", "actors", _at("latents", S.latents_fp),
          lambda cfg: S.outlier_stages(cfg)[1]),
    Stage("student", "training", _trained("student"), inputs=S.with_outlier_files),
    evaluation("base"),
    evaluation("student"),
    Stage("detector", "whole", S.detector_target, work=_detector),
)


def named(name: str) -> Stage:
    """The stage of that name in `STAGES` (one clear error naming them all when there is none)."""
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"no stage named {name!r}; the stages: {', '.join(s.name for s in STAGES)}")


def plan(cfg: C.OALConfig, first: str | None = None, last: str | None = None) -> list[Stage]:
    """The stages this config's pipeline runs, in order; from `first` to `last` (both included) when given."""
    names = [s.name for s in STAGES]
    lo = names.index(first) if first else 0
    hi = names.index(last) + 1 if last else len(names)
    return [s for s in STAGES[lo:hi] if s.needed(cfg)]


def run_all(cfg: C.OALConfig, todo: list[Stage], results: dict[str, S.StageResult],
            run_one: Callable[[Stage, C.OALConfig], S.StageResult]) -> C.OALConfig:
    """`todo` in order, each by `run_one(stage, cfg)` (which calls `run` with its executor, and may track it),
    each result into `results`; returns the config with every stage's `inputs` applied (what the stages after
    them read)."""
    for stage in todo:
        if stage.inputs is not None:
            cfg = stage.inputs(cfg, results)
        results[stage.name] = run_one(stage, cfg)
    return cfg


class Local:
    """Executor: every stage in this process, on `bench` (built once by the caller) where a stage reads the data."""

    def __init__(self, bench: Benchmark | None = None, progress: bool = True, on_epoch_end: S.EpochHook | None = None,
                 accelerator: Any = None):
        self.bench, self.progress, self.on_epoch_end, self.accelerator = bench, progress, on_epoch_end, accelerator

    def compute(self, stage: Stage, cfg: C.OALConfig, fp: str, force: bool) -> S.StageResult:
        if stage.runs == "training":
            return S.compute_training(cfg, stage.name, fp, self.bench, self.on_epoch_end, self.accelerator,
                                      self.progress, force)
        if stage.runs == "actors":
            return S.compute_latents(cfg, fp, force, self.progress)
        assert stage.work is not None  # Stage checks it for sharded and whole stages
        work = stage.work(cfg, fp, self.bench)
        if stage.runs == "sharded":
            shard_fn, finish = work
            return finish([shard_fn(shard=(0, 1))])
        return work()  # whole


def run_stage(name: str, cfg: C.OALConfig, bench: Benchmark | None = None, on_epoch_end: S.EpochHook | None = None,
              accelerator: Any = None, progress: bool = True, force: bool = False) -> S.StageResult:
    """One stage by name, in this process (what `oal <stage>` runs), skipped when up to date."""
    return run(named(name), cfg, Local(bench, progress, on_epoch_end, accelerator), force)


def evaluate(cfg: C.OALConfig, checkpoint: str | None = None, bench: Benchmark | None = None,
             out_dir: Path | None = None, force: bool = False, of: str = "student") -> tuple[S.StageResult, Any]:
    """Score a checkpoint (default: the `of` stage's, student or base) on the ID test set and every near/far OOD
    test set, with the weights `eval.checkpoint` selects (last epoch, or best ID validation accuracy), in this
    process: (result, its EvalReport, or None when skipped)."""
    res = run(evaluation(of, checkpoint, out_dir), cfg, Local(bench), force)
    return res, res.report


def run_pipeline(cfg: C.OALConfig, progress: bool = True) -> dict[str, S.StageResult]:
    """Every stage this config needs (`plan`), in order, in this process; each skipped when its outputs match its
    inputs. Then `<run>/results.md`, the CE baseline beside the OAL student."""
    from oal.data import build_benchmark

    S.check_data(cfg)
    local = Local(build_benchmark(cfg.data), progress)
    results: dict[str, S.StageResult] = {}
    cfg = run_all(cfg, plan(cfg), results, lambda stage, c: run(stage, c, local))
    S.write_comparison(cfg)
    return results
