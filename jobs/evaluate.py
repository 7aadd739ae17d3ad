"""Evaluate a checkpoint on the Ray cluster: ID accuracy and OOD metrics on every test set, tracked in MLflow.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.evaluate --config digits [--checkpoint PATH | --trial ID] [--force] [key=value ...]

What is evaluated: by default the config's OAL student (<output_dir>/<name>/student/checkpoint.pt);
--checkpoint a checkpoint file, a stage folder holding checkpoint.pt, or a Ray Train run folder (its newest
checkpoint_*/checkpoint.pt); --trial a Ray Tune trial of `jobs.tune` run with the same config (its finished
student, else the newest checkpoint of its Ray Train run: a trial that ASHA stopped early has only that). The
architecture is read from the checkpoint. The evaluation runs in a Ray worker (a GPU with cluster.use_gpu=true)
and writes <output_dir>/<name>/evaluations/<label>/ (results.md, results.json, plots); an evaluation whose
checkpoint and settings are unchanged is skipped unless --force. With MLflow configured (MLFLOW_TRACKING_URI or
tracking.uri) it is one run of kind "evaluate" with the stage's metrics and files.
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

from jobs import common
from oal import config as C
from oal import stages, storage
from oal.tracking import Tracker
from oal.train import CHECKPOINT


def _newest_ray_checkpoint(run: str | Path) -> Path | None:
    """The newest checkpoint_*/checkpoint.pt of a Ray Train run folder (local, or in the object store: listed
    there and fetched), None when it has none."""
    found = sorted(storage.listing(run, f"checkpoint_*/{CHECKPOINT}"), key=lambda p: p.parent.name)
    return storage.pull(found[-1]) if found else None


def resolve(cfg: C.OALConfig, checkpoint: str | None, trial: str | None) -> tuple[Path, str]:
    """The checkpoint file to evaluate and a label for its output folder; one clear error when there is none."""
    if checkpoint and trial:
        raise ValueError("give --checkpoint or --trial, not both")
    if trial:
        from jobs.tune import trial_name

        name = trial_name(cfg, trial)
        trial_cfg = replace(cfg, name=name)  # the trial's own run folder (jobs.tune.trial_config)
        finished = trial_cfg.run_dir / "student" / CHECKPOINT
        # its Ray Train run, in the trial's Ray storage (the bucket's when output_dir is s3://)
        ray_run = f"{trial_cfg.ray_storage.rstrip('/')}/{name}-student"
        pulled = storage.pull(finished)
        path = pulled if pulled.is_file() else _newest_ray_checkpoint(ray_run)
        if path is None:
            raise FileNotFoundError(f"trial '{trial}' has no checkpoint: neither {storage.uri(finished)} nor a "
                                    f"checkpoint_*/{CHECKPOINT} under {ray_run} (is it a trial id of a search run "
                                    f"with this config, e.g. from {cfg.run_dir / 'tune' / 'trials.md'}?)")
        return path, f"trial-{trial}"
    if not checkpoint:
        path = stages.stage_dir(cfg, "student") / CHECKPOINT
        if not storage.exists(path):
            raise FileNotFoundError(f"no student checkpoint at {path}: run the pipeline first, or give --checkpoint")
        return path, "student"
    # a file or folder here, or an object or folder of objects in the store (s3://...)
    given = storage.local(checkpoint) if storage.is_uri(checkpoint) else Path(checkpoint).expanduser().resolve()
    if storage.pull(given).is_file():
        path = given
    elif storage.pull(given / CHECKPOINT).is_file():
        path = given / CHECKPOINT
    else:
        found = _newest_ray_checkpoint(given)
        if found is None:
            raise FileNotFoundError(f"checkpoint '{checkpoint}' is neither a checkpoint file nor a folder holding "
                                    f"{CHECKPOINT} or checkpoint_*/{CHECKPOINT} (a Ray Train run folder)")
        path = found
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{path.parent.name}-{path.stem}").strip("-")
    return path, label


def run(cfg: C.OALConfig, checkpoint: str | None = None, trial: str | None = None, force: bool = False,
        tracker: Tracker | None = None) -> tuple[stages.StageResult, Path]:
    path, label = resolve(cfg, checkpoint, trial)
    tracker = tracker or Tracker.from_env(cfg)
    out = cfg.run_dir / "evaluations" / label
    with tracker.pipeline_run(cfg, kind="evaluate"):
        with tracker.stage("eval", cfg):
            result, report = common.evaluate_on_workers(cfg, f"the evaluation of {path}", str(path), out_dir=out,
                                                        force=force)
            tracker.record_stage(result, report=report, cfg=cfg)
    return result, path


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint file, stage folder or Ray Train run folder")
    p.add_argument("--trial", default=None, help="trial id of a jobs.tune search with this config")
    p.add_argument("--force", action="store_true", help="evaluate again even when up to date")
    args = p.parse_args(argv)
    cfg = common.load(args)
    try:
        resolve(cfg, args.checkpoint, args.trial)  # before connecting: a wrong path fails at once
    except (ValueError, FileNotFoundError) as e:
        print(f"jobs.evaluate: {e}", file=sys.stderr)
        return 2
    common.connect(args.address)
    with common.data_errors("jobs.evaluate"):
        result, path = run(cfg, args.checkpoint, args.trial, args.force)
    print(f"[eval] {'skipped (up to date)' if result.skipped else 'done'}: {path}")
    print(storage.pull(result.outputs["table"]).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
