"""The scaffold under both training loops (the classifier's `oal.train.fit`, the diffusion model's
`oal.ldm.fit_ldm`): resume from a checkpoint (weights, optimizer states and the RNG streams), a progress bar and
running loss sums per epoch, the epoch's metrics, an atomic checkpoint every few epochs, a printed line and the
caller's hook. The loops themselves hold only their per-step work and what their checkpoints add.

    epochs = Epochs(acc, out / CHECKPOINT, total, what="model/loss", progress=True, on_epoch_end=hook)
    epochs.resume(load)                      # when resuming: `load(state)` takes weights and optimizer states
    for epoch in epochs:
        for x, y in epochs.batches(loader, f"epoch {epoch + 1}/{total}"):
            ...; epochs.add({**terms, "total": loss})
        epochs.end(epochs.metrics(epoch, lr), lambda: {"modules": ..., "optimizer": ...})
    return epochs.result()
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from oal.storage import load_torch, save_torch

CHECKPOINT = "checkpoint.pt"


@dataclass
class FitResult:
    checkpoint: Path
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: int = 0


def bar_off(wanted: bool) -> bool | None:
    """tqdm's `disable`: off when not wanted; otherwise None, tqdm's own rule: a bar on a terminal only. A bar
    in a Ray worker or a log file would print a line per update; the per-epoch summary lines stay."""
    return True if not wanted else None


def rng_state() -> dict[str, Any]:
    """The RNG streams as tensors and plain values: a checkpoint loads with `weights_only=True` (no numpy objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(s["python"])


def restore(ckpt_path: Path, what: str, load: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read a resumable checkpoint, hand it to `load` (weights, optimizer states; a mismatch is one clear error
    naming `what`), restore the RNG streams, and return it."""
    state = load_torch(ckpt_path, "checkpoint")
    try:
        load(state)
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"checkpoint '{ckpt_path}' does not match this {what} configuration: "
                         f"{str(e).splitlines()[0]}") from None
    set_rng_state(state["rng"])
    return state


class Epochs:
    """Epochs `start..total` of one training run, writing `ckpt_path`. `what` names the configuration a checkpoint
    that does not fit is reported against; `checkpoint_every` epochs (and after the last) the checkpoint is written
    by the main process, the others waiting; `on_epoch_end(epoch, metrics, checkpoint)` runs on every rank after
    each epoch (Ray Train reports there)."""

    def __init__(self, acc: Accelerator, ckpt_path: Path, total: int, *, what: str, progress: bool = True,
                 on_epoch_end: Callable[[int, dict[str, float], Path], None] | None = None,
                 checkpoint_every: int = 1) -> None:
        self.acc, self.ckpt_path, self.total, self.what = acc, ckpt_path, total, what
        self.progress, self.on_epoch_end, self.checkpoint_every = progress, on_epoch_end, checkpoint_every
        self.start = 0
        self.history: list[dict[str, float]] = []
        self.bar: Any = None
        self._sums: dict[str, torch.Tensor] = {}
        self._steps, self._t0 = 0, 0.0

    def resume(self, load: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
        """Continue from the checkpoint when there is one (`load` takes its weights and optimizer states, the RNG
        streams are restored): the epochs it holds are skipped and its history kept. Returns it, or None."""
        if not self.ckpt_path.exists():
            return None
        state = restore(self.ckpt_path, self.what, load)
        self.start = state["epoch"]
        self.history = list(state.get("history", []))[: self.start]  # the epochs before the interruption
        return state

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.total))

    def batches(self, loader: Iterable[Any], desc: str) -> Iterator[Any]:
        """The epoch's batches behind a progress bar (`self.bar`; a bar only on the main process, on a terminal),
        its loss sums and clock started."""
        self._sums, self._steps, self._t0 = {}, 0, time.perf_counter()
        self.bar = tqdm(loader, desc=desc, disable=bar_off(self.progress and self.acc.is_main_process), leave=False,
                        dynamic_ncols=True)
        return iter(self.bar)

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """One step's loss terms. The sums stay on the device: one host sync per epoch, not one per term and step."""
        for k, v in terms.items():
            self._sums[k] = self._sums[k] + v.detach().float() if k in self._sums else v.detach().float()
        self._steps += 1

    def metrics(self, epoch: int, lr: float) -> dict[str, float]:
        """The epoch's mean loss terms (`loss/<term>`), learning rate, number (from 1) and seconds."""
        out = {f"loss/{k}": float(v) / max(self._steps, 1) for k, v in self._sums.items()}
        out.update({"lr": lr, "epoch": epoch + 1, "epoch_seconds": time.perf_counter() - self._t0})
        return out

    def end(self, metrics: dict[str, float], state: Callable[[], dict[str, Any]], label: str = "epoch") -> None:
        """Close the epoch `metrics["epoch"]`: keep its metrics, write the checkpoint when due (`state()`: what the
        loop stores; the RNG streams, epoch, history and the epoch resumed from are added), print its line, call
        the hook."""
        done = int(metrics["epoch"])
        self.history.append(metrics)
        if done % self.checkpoint_every == 0 or done == self.total:
            self.acc.wait_for_everyone()
            if self.acc.is_main_process:
                save_torch({**state(), "rng": rng_state(), "epoch": done, "history": self.history,
                            "resumed_from_epoch": self.start}, self.ckpt_path)
            self.acc.wait_for_everyone()
        if self.acc.is_main_process and self.progress:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch")
            tqdm.write(f"{label} {done}/{self.total}: {shown}")
        if self.on_epoch_end is not None:
            self.on_epoch_end(done, metrics, self.ckpt_path)

    def result(self) -> FitResult:
        return FitResult(checkpoint=self.ckpt_path, history=self.history, resumed_from_epoch=self.start)
