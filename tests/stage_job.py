"""A stage added the way docs/architecture.md says: its functions here, one `Stage` value placed after the
embeddings stage. `python -m tests.stage_job ARGS` runs `jobs.pipeline` (the same arguments) with it in the
registry: what a team's own stage looks like when submitted with `ray job submit`."""

from __future__ import annotations

import functools
import sys
from typing import Any

from oal import config as C
from oal import registry
from oal import stages as S
from oal.storage import load_torch, save_torch, write_json


def _stats(cfg: C.OALConfig, fp: str) -> S.StageResult:
    """Per-class mean norm of the teacher's ID features, read through the embeddings stage's manifest; a summary
    to look at (JSON) and one figure (`metrics`), which tracking logs as it logs every stage's."""
    emb = load_torch(S.output_of(cfg, "embeddings", "embeddings"), "ID embeddings")["embeddings"]  # (C, N, D)
    d = S.stage_dir(cfg, "feature_stats")
    norms = emb.float().norm(dim=-1).mean(dim=1)
    save_torch({"mean_norm": norms}, d / "stats.pt")
    write_json({"mean_norm": norms.tolist()}, d / "summary.json")
    return S.finish_stage("feature_stats", d, fp, cfg, {"stats": d / "stats.pt", "summary": d / "summary.json"},
                          classes=int(emb.shape[0]), metrics={"mean_feature_norm": float(norms.mean())})


def _work(cfg: C.OALConfig, fp: str, bench: Any) -> functools.partial:
    return functools.partial(_stats, cfg, fp)


STAGE = registry.Stage("feature_stats", "whole", after=("embeddings",), needed=lambda cfg: any(S.outlier_stages(cfg)),
                       work=_work)


def with_stage(stages: tuple[registry.Stage, ...]) -> tuple[registry.Stage, ...]:
    """`stages` with STAGE right after the embeddings stage (the one registry entry)."""
    at = [s.name for s in stages].index("embeddings") + 1
    return (*stages[:at], STAGE, *stages[at:])


def main(argv: list[str] | None = None) -> int:
    from jobs import pipeline

    registry.STAGES = with_stage(registry.STAGES)
    return pipeline.main(argv)


if __name__ == "__main__":
    sys.exit(main())
