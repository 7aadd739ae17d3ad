"""Shared fixtures. Tiers: plain unit tests (default), `ray`, `stack` and `slow` markers."""

from __future__ import annotations

import os

import torch

from oal.config import QUICK_OVERRIDES

os.environ.setdefault("TQDM_DISABLE", "1")

# The real local stack (Ray head with token auth, MLflow server, S3 server), started once per session
# and only when a test asks for it.
pytest_plugins = ["tests.stack_fixtures"]
torch.set_num_threads(1)

QUICK = list(QUICK_OVERRIDES)  # a fast digits config: few epochs, small k-NN and diffusion settings
