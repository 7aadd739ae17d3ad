"""What every job shares: argument parsing, config loading and connecting to Ray with clear errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from oal import config as C

log = logging.getLogger("oal.jobs")
TOKEN_HELP = ("Ray's token authentication is on (Ray 2.5x+ default): the client needs RAY_AUTH_MODE=token and "
              "the token, read from RAY_AUTH_TOKEN, or the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token "
              "(print it on the head with `ray get-auth-token`).")
START_HELP = "start a local one with `python -m cluster.stack up` (or `ray start --head`)"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", "-c", default="digits", help="preset name or YAML path (default: digits)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a running local head)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. student.epochs=3")
    return p


def load(args: argparse.Namespace) -> C.OALConfig:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = C.load_config(args.config, args.overrides)
    except C.ConfigError as e:
        sys.exit(f"config error: {e}")
    # Outputs are addressed by absolute path: Ray workers do not share the driver's working directory.
    return C.from_dict({**C.to_dict(cfg), "output_dir": str(Path(cfg.output_dir).resolve())})


def connect(address: str | None = None) -> None:
    """Attach to a running Ray cluster, or explain how to get one. Inside `ray job submit` this finds the
    job's cluster by itself."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    if address.startswith("http"):
        # RAY_ADDRESS=http://...:8265 is the job server's address (for `ray job submit`); a driver joins
        # the cluster through the GCS, which `auto` finds on this machine.
        address = "auto"
    if os.environ.get("RAY_AUTH_MODE") != "token":
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
    except ConnectionError as e:
        sys.exit(f"no Ray cluster at '{address}' ({str(e).rstrip('.')}); {START_HELP}")
    except Exception as e:  # Ray raises several types for a refused token
        if "auth" in str(e).lower() or "token" in str(e).lower():
            sys.exit(f"Ray refused the connection ({e}). {TOKEN_HELP}")
        raise
