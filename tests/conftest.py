"""Shared fixtures. Tiers: plain unit tests (default), `ray`, `stack` and `slow` markers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")

# The real local stack (Ray head with token auth, MLflow server, S3 server), started once per session
# and only when a test asks for it.
pytest_plugins = ["tests.stack_fixtures"]
torch.set_num_threads(1)

# A fast digits config: few epochs, small k-NN settings.
QUICK = [
    "teacher.epochs=3",
    "student.epochs=2",
    "knn.k=5",
    "knn.select=5",
    "knn.rounds=2",
    "knn.pic_nums=2",
    "knn.candidates=20",
    "knn.per_class_cap=30",
    "eval.plots=false",
    "diffusion.steps=2",
    "diffusion.num_outliers=12",
    "diffusion.shard_size=6",
    "diffusion.batch_size=6",
    "diffusion.projection_steps=20",
    "diffusion.grid_samples=4",
]


@pytest.fixture
def quick_cfg(tmp_path):
    from oal.config import load_config

    def make(*overrides: str):
        return load_config("digits", [*QUICK, f"output_dir={tmp_path / 'runs'}", *overrides])

    return make
