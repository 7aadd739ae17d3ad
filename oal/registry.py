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

import dataclasses
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


Names = tuple[str, ...] | Callable[[C.OALConfig], tuple[str, ...]]  # stage names, fixed or by config


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    name:    the stage, its output folder under the run, and its MLflow run name.
    runs:    how it computes: training | sharded | whole | actors (module docstring).
    reads:   the config sections it depends on (a section, a top-level key such as seed, or `section.key` for one
             key that stages of several sections share: diffusion.prompt); every field of a section counts but
             those declared NOT_AN_INPUT.
    after:   the stages whose outputs it reads (fixed, or cfg -> names): their identities enter its fingerprint.
    also:    cfg -> what else its outputs depend on that is no config value: the files it reads (`S.file_id`:
             the fingerprint of the stage that wrote one, else its size and time), a pretrained model's sha256.
    given:   cfg -> the identity of a file the config gives in place of this stage's output (teacher.checkpoint),
             or None when the stage's own output is used.
    version: raised when the stage's code changes what it computes, so that finished outputs are redone.
    needed:  cfg -> whether this config's pipeline runs it.
    work:    (cfg, fingerprint, benchmark or None) -> the functions that compute it (sharded: ShardedWork; whole: one
             function of no argument). Each is picklable (module-level functions, partials of them): a Ray task
             runs it. A benchmark given is the one this process built (in-process); None: each task builds its own.
    inputs:  (cfg, the results so far) -> the config with what earlier stages wrote filled in, for this stage and
             those after it (the student's outlier files).
    folder:  cfg -> its output folder, when not `<run>/<name>` (an evaluation into a folder of its own).
    """

    name: str
    runs: str
    reads: tuple[str, ...] = ()
    after: Names = ()
    also: Callable[[C.OALConfig], list[Any]] | None = None
    given: Callable[[C.OALConfig], str | None] | None = None
    version: int = 1
    needed: Callable[[C.OALConfig], bool] = lambda cfg: True
    work: Callable[[C.OALConfig, str, Benchmark | None], Any] | None = None
    inputs: Callable[[C.OALConfig, dict[str, S.StageResult]], C.OALConfig] | None = None
    folder: Callable[[C.OALConfig], Path] | None = None

    def __post_init__(self) -> None:
        if self.runs not in RUNS:
            raise ValueError(f"stage {self.name}: runs={self.runs!r}; expected one of {', '.join(RUNS)}")
        if self.runs in ("sharded", "whole") and self.work is None:
            raise ValueError(f"stage {self.name} runs {self.runs} and declares no work: give work=(cfg, fingerprint, "
                             f"benchmark) -> " + ("(shard function, finish function)" if self.runs == "sharded" else
                                                  "the function that computes it"))
        for key in self.reads:
            try:
                C.inputs_of(C.OALConfig(), key)
            except AttributeError:
                raise ValueError(f"stage {self.name} reads {key!r}, which is no config section or key; expected "
                                 f"one of {', '.join(f.name for f in dataclasses.fields(C.OALConfig))} (or "
                                 f"section.key)") from None

    def target(self, cfg: C.OALConfig) -> tuple[Path, str]:
        """Its folder and its fingerprint: what `run` checks before any work."""
        return (self.folder(cfg) if self.folder else S.stage_dir(cfg, self.name)), fingerprint(self, cfg)


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


def fingerprint(stage: Stage | str, cfg: C.OALConfig) -> str:
    """What a stage's outputs depend on, hashed: its name and version, the sections it reads, the identities of
    the stages it reads after, and what else it declares (`Stage.also`). Derived from the declaration alone."""
    stage = named(stage) if isinstance(stage, str) else stage
    after = stage.after(cfg) if callable(stage.after) else stage.after
    reads = {key: S.data_id(cfg) if key == "data" else C.inputs_of(cfg, key) for key in stage.reads}
    return C.fingerprint(stage.name, stage.version, reads, {name: identity(name, cfg) for name in after},
                         stage.also(cfg) if stage.also else [])


def identity(name: str, cfg: C.OALConfig) -> str:
    """What stands for a stage's output in the fingerprints after it: the file the config gives in its place
    (`Stage.given`), else its fingerprint."""
    stage = named(name)
    given = stage.given(cfg) if stage.given else None
    return given if given is not None else fingerprint(stage, cfg)


def train_stage(cfg: C.OALConfig, name: str, **kwargs: Any) -> Any:
    """`oal.stages.train_stage` with the stage's fingerprint (the FitResult; nothing recorded in the stage folder
    unless `out_dir` is it)."""
    return S.train_stage(cfg, name, fingerprint(name, cfg), **kwargs)


# ---- the stages' targets and work ----------------------------------------------------------------------------


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


def _student_after(cfg: C.OALConfig) -> tuple[str, ...]:
    """The trained networks the student reads: the teacher (a KD term), the base student (student.init=base)."""
    return (("teacher",) if cfg.loss.uses_teacher else ()) + (("base",) if cfg.student.init == "base" else ())


def _outlier_files(cfg: C.OALConfig) -> list[Any]:
    """The outlier files the student's terms read (filled in from the k-NN and latents stages by their inputs)."""
    L, O = cfg.loss, cfg.outliers
    used = [(L.uses_knn, O.knn_path), (L.uses_latent, O.latent_path), (L.uses_pixel, O.pixel_path)]
    return [S.file_id(path) for use, path in used if use]


def _diffusion_given(cfg: C.OALConfig) -> str | None:
    """A diffusion model not trained here (a diffusers folder, a hub id, builtin-tiny) is its name; builtin-ldm's
    weights given by diffusion.checkpoint are that file."""
    if not S.trained_diffusion(cfg):
        return cfg.diffusion.model
    return S.file_id(cfg.diffusion.checkpoint)


def _pretrained_sha(cfg: C.OALConfig) -> list[Any]:
    from oal.pretrained import card_of

    card = card_of(cfg)  # a pretrained model's weights are an input: another file, another model
    return [card.get("sha256")] if card else []


def evaluation(of: str, checkpoint: str | None = None, out_dir: Path | None = None) -> Stage:
    """The evaluation of the `of` stage's checkpoint (student or base; `checkpoint` instead, when given) into its
    folder (`out_dir` instead, when given): sharded over the data sets it scores. Its result's `report` is the
    EvalReport (when computed). It depends on the checkpoint through that file's identity (`S.file_id`)."""
    name = S.EVAL_DIRS[of]

    def scored(cfg: C.OALConfig) -> str:
        return str(checkpoint or S.eval_checkpoint(cfg, of))

    def work(cfg: C.OALConfig, fp: str, bench: Benchmark | None) -> ShardedWork:
        target = (Path(scored(cfg)), of, out_dir or S.stage_dir(cfg, name), fp)
        return (functools.partial(S.eval_shard, cfg, scored(cfg), bench, of),
                functools.partial(S.finish_evaluation, cfg, target))

    needed = (lambda cfg: cfg.eval.baseline) if of == "base" else (lambda cfg: True)
    return Stage(name, "sharded", reads=("data", "eval", "weights"), also=lambda cfg: [S.file_id(scored(cfg))],
                 needed=needed, work=work, folder=(lambda cfg: out_dir) if out_dir else None)


STAGES: tuple[Stage, ...] = (
    Stage("base", "training", reads=("data", "model", "base", "seed"), needed=S.needs_base,
          given=lambda cfg: S.file_id(cfg.base.checkpoint)),
    Stage("teacher", "training", reads=("data", "teacher", "seed"), given=lambda cfg: S.file_id(cfg.teacher.checkpoint)),
    Stage("diffusion", "training", reads=("data", "ldm", "diffusion.prompt", "seed"), also=_pretrained_sha,
          given=_diffusion_given, needed=S.needs_diffusion),
    Stage("embeddings", "sharded", reads=("embeddings", "weights"), after=("teacher",), needed=_needs_outliers,
          work=_embeddings),
    Stage("anchors", "whole", reads=("anchors", "diffusion.prompt", "seed"), after=("embeddings", "diffusion"),
          needed=_needs_outliers, work=_anchors),
    # version 2: each class draws from its own seeded generator (outputs differ from version 1's)
    Stage("knn", "sharded", reads=("knn", "seed"), after=("anchors",), version=2, needed=_needs_outliers, work=_knn),
    Stage("latents", "actors", reads=("diffusion", "seed"), after=("knn",), needed=lambda cfg: S.outlier_stages(cfg)[1]),
    Stage("student", "training", reads=("data", "model", "student", "loss", "seed", "weights"), after=_student_after,
          also=_outlier_files, inputs=S.with_outlier_files),
    evaluation("base"),
    evaluation("student"),
    Stage("detector", "whole", reads=("detector",), also=lambda cfg: [S.evaluated(cfg)["fingerprint"]],
          work=_detector),
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
    test set, with the weights `weights` selects (last epoch, or best ID validation accuracy), in this
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
