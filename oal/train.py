"""One Accelerate training loop for both the teacher fine-tune (cross-entropy) and the OAL student.

Runs as one process here, or as one rank of a distributed group (Ray Train sets up the process group;
Accelerate picks it up). Checkpoints hold everything needed to resume to the same weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from oal.config import LDMConfig, TrainConfig
from oal.epochs import CHECKPOINT, Epochs, FitResult, rng_state, set_rng_state
from oal.losses import OALLoss
from oal.models import classifier_head
from oal.storage import load_torch


class NonFiniteLossError(RuntimeError):
    """Raised when a loss term becomes NaN or infinite; the last good checkpoint is left in place."""


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but no CUDA device is visible; use device=cpu or device=auto")
    return device


def resolve_precision(mixed_precision: str, device: str) -> str:
    """`auto`: bf16 autocast on a GPU that supports it, none elsewhere; other values as they are."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(device: str, cfg: TrainConfig | LDMConfig) -> Accelerator:
    device = resolve_device(device)
    precision = resolve_precision(cfg.mixed_precision, device)
    if device == "cpu" and precision == "fp16":
        raise ValueError("mixed_precision=fp16 needs a GPU; use 'no' or 'bf16' on CPU")
    # cpu=True matters inside Ray Train: without it Accelerate on CPU ignores the gloo group and every
    # rank trains alone (see STACK-NOTES).
    return Accelerator(cpu=device == "cpu", mixed_precision=precision,
                       gradient_accumulation_steps=getattr(cfg, "grad_accum_steps", 1))


def channels_last(acc: Accelerator, cfg: TrainConfig) -> bool:
    """Channels-last layout for this run: asked for, and on a GPU (cuDNN's fast convolution kernels want it;
    on a CPU it only adds layout conversions)."""
    return cfg.channels_last and acc.device.type == "cuda"


def to_device(x: torch.Tensor, acc: Accelerator, last: bool) -> torch.Tensor:
    """An input batch on the run's device, in channels-last layout where `last` and the batch is an image batch."""
    x = x.to(acc.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if last and x.dim() == 4 else x


def frozen_teacher(teacher: nn.Module, acc: Accelerator, cfg: TrainConfig) -> nn.Module:
    """The frozen teacher of the student's training, moved (and cast) in place: eval mode, no gradients, on the
    run's device; its weights in bf16 once (`cfg.teacher_dtype`; auto: where the run's mixed precision is bf16)
    rather than cast per op under autocast; channels-last where the run uses it."""
    dtype = cfg.teacher_dtype
    if dtype == "auto":
        dtype = "bf16" if acc.mixed_precision == "bf16" else "fp32"
    teacher = teacher.to(acc.device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    if channels_last(acc, cfg):
        teacher = teacher.to(memory_format=torch.channels_last)
    return teacher.eval().requires_grad_(False)


def place(modules: Step, optimizer: torch.optim.Optimizer, teacher: nn.Module | None, acc: Accelerator,
          cfg: TrainConfig) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module | None, bool]:
    """Network, loss and frozen teacher on the run's device as `fit` trains them (channels-last where the run uses
    it, Accelerate's wrapping, the teacher's copy): (model, optimizer, teacher, channels-last?)."""
    last = channels_last(acc, cfg)
    if last:
        modules.to(memory_format=torch.channels_last)
    model, optimizer = acc.prepare(modules, optimizer)
    return model, optimizer, (frozen_teacher(teacher, acc, cfg) if teacher is not None else None), last


def teacher_targets(teacher: nn.Module, x: torch.Tensor, acc: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's logits (B, K) and features (B, D_t) in fp32. A bf16 copy takes bf16 input; an fp32
    one runs under the run's autocast (fp16 mixed precision: fp16 per op)."""
    dtype = next(teacher.parameters()).dtype
    with torch.no_grad():
        if dtype == torch.float32:
            with acc.autocast():
                logits, feat = teacher(x)
        else:
            logits, feat = teacher(x.to(dtype))
    return logits.float(), feat.float()


def train_step(acc: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, teacher: nn.Module | None, x: torch.Tensor,
               y: torch.Tensor, knn: torch.Tensor | None, latent: torch.Tensor | None,
               check: Callable[[torch.Tensor, dict[str, torch.Tensor]], None] | None = None,
               pixel: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step of `fit` (and of bench.gpu_speed): the frozen teacher's targets, the network and loss under the
    run's autocast, backward, optimizer and (on a real optimizer step) scheduler step. `check(total, terms)` runs
    before backward. Returns the total loss and its terms, not detached."""
    with acc.accumulate(model):
        t_logits = t_feat = None
        if teacher is not None:
            t_logits, t_feat = teacher_targets(teacher, x, acc)  # (B, K), (B, D_t)
        with acc.autocast():
            total, terms = model(x, y, t_logits, t_feat, knn, latent, pixel)
        if check is not None:
            check(total, terms)
        acc.backward(total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients and not acc.optimizer_step_was_skipped:  # fp16: a step the scaler skipped
            scheduler.step()
    return total, terms


def load_outliers(path: str | None, what: str) -> torch.Tensor | None:
    """Read an outlier file: a tensor [N, D] (or [C, M, D], flattened), finite, float32."""
    if path is None:
        return None
    obj = load_torch(path, f"{what} file")
    x = obj["outliers"] if isinstance(obj, dict) and "outliers" in obj else obj
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} file '{path}' holds a {type(x).__name__}; expected a tensor [N, D] or [C, M, D]")
    if x.dim() == 3:
        x = x.reshape(-1, x.shape[-1])  # (C*M, D)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{what} file '{path}' has shape {tuple(x.shape)}; expected [N, D] or [C, M, D], N > 0")
    bad = (~torch.isfinite(x)).any(dim=1).sum().item()
    if bad:
        raise ValueError(f"{what} file '{path}' has {bad} rows with NaN or infinite values")
    return x.float()


def load_pixel_outliers(path: str | None, image_size: int, channels: int = 3) -> torch.Tensor | None:
    """Read decoded outliers {"images": [N, C, H, W]} (uint8, or float in [0, 1]) and resize them to the student's
    input side: uint8 [N, C, image_size, image_size]. Square images of the model's channel count only; anything
    else is one error naming the file, its shape and what the model takes."""
    if path is None:
        return None
    obj = load_torch(path, "pixel outlier file")
    x = obj.get("images") if isinstance(obj, dict) else obj
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"pixel outlier file '{path}' holds no image tensor; expected {{'images': uint8 [N, "
                         f"{channels}, H, W]}} (the latents stage writes one with diffusion.mode=pixel)")
    want = f"[N, {channels}, S, S] (square, any side S: resized to data.image_size={image_size})"
    if x.dim() != 4 or x.shape[0] == 0 or x.shape[1] != channels or x.shape[2] != x.shape[3]:
        raise ValueError(f"pixel outlier file '{path}' has images of shape {tuple(x.shape)}; the student takes "
                         f"{channels}-channel square images: expected {want}")
    if x.dtype != torch.uint8:
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ValueError(f"pixel outlier file '{path}' has float images outside [0, 1] or not finite; expected "
                             f"uint8, or floats in [0, 1]")
        x = (x.float() * 255).round().to(torch.uint8)
    if x.shape[-1] != image_size:
        out = [nn.functional.interpolate(x[i:i + 256].float(), size=(image_size, image_size), mode="bilinear",
                                         align_corners=False, antialias=x.shape[-1] > image_size)
               for i in range(0, len(x), 256)]
        x = torch.cat(out).round().clamp(0, 255).to(torch.uint8)
    return x  # (N, C, S, S)


class Step(nn.Module):
    """Network + loss in one module, so that the forward goes through DDP's wrapper (gradient sync)."""

    def __init__(self, net: nn.Module, loss: OALLoss | None):
        super().__init__()
        self.net = net
        self.loss = loss

    def forward(self, x: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor | None,
                t_feat: torch.Tensor | None, knn: torch.Tensor | None,
                latent: torch.Tensor | None, pixel: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Decoded outliers (pixel OE) share the ID batch's forward pass, as outlier exposure trains: one pass, and
        # BatchNorm sees both.
        n = len(x)
        logits, feat = self.net(x if pixel is None else torch.cat([x, pixel]))  # (B [+ P], K), (B [+ P], D_s)
        pixel_logits = None if pixel is None else logits[n:].float()  # (P, K)
        logits, feat = logits[:n], feat[:n]
        if self.loss is None:
            ce = nn.functional.cross_entropy(logits, y)
            return ce, {"ce": ce}
        res = self.loss(logits.float(), feat.float(), y, t_logits, t_feat, knn, latent,
                        head=classifier_head(self.net), pixel_logits=pixel_logits)
        return res.total, res.terms


def single_last_batch(n: int, batch_size: int) -> bool:
    """Whether `n` samples in batches of `batch_size` end in a batch of one: BatchNorm in training mode cannot
    normalise a single sample ("Expected more than 1 value per channel"), so such a batch is dropped (the drop is
    the same on every rank: DistributedSampler gives each rank the same count). Other last batches are kept."""
    return n > 1 and n % batch_size == 1


def recompute_bn_stats(net: nn.Module, train_set: Dataset, images: int, batch_size: int, acc: Accelerator,
                       seed: int) -> bool:
    """PreciseBN: replace BatchNorm's running statistics, a momentum average over weights that kept changing,
    by the statistics of the current weights on `images` training images (a seeded draw; each rank takes its
    share and the ranks average). Validation and the checkpoint then see the network as it is: early in a run
    at a high learning rate the lagging averages cost tens of points of validation accuracy, which made early
    epochs useless for ranking trials. Weights do not change; returns False where there is no BatchNorm."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if images <= 0 or not bns:
        return False
    gen = torch.Generator().manual_seed(seed)
    n = min(len(train_set), max(images, acc.num_processes))  # type: ignore[arg-type]
    share = torch.randperm(len(train_set), generator=gen)[:n][acc.process_index::acc.num_processes]  # type: ignore[arg-type]
    loader = DataLoader(Subset(train_set, share.tolist()), batch_size=batch_size, generator=gen,
                        drop_last=single_last_batch(len(share), batch_size))
    # Random augmentation in the dataset draws from the global RNGs: restore them, so that the training that
    # follows is the same with PreciseBN on or off (and a resumed run the same as an uninterrupted one).
    rng = rng_state()
    if len(share) > 1:  # a rank with one image keeps its statistics (and still joins the average below)
        with acc.autocast():
            update_bn(loader, net, acc.device)
    set_rng_state(rng)
    if acc.num_processes > 1:
        for m in bns:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:  # always, with track_running_stats
                    buf.copy_(acc.reduce(buf, reduction="mean"))
    return True


def _param_groups(net: nn.Module, loss: OALLoss | None, cfg: TrainConfig) -> list[dict]:
    if cfg.head_lr is None:
        groups = [{"params": list(net.parameters()), "lr": cfg.lr, "name": "net"}]
    else:  # the reference teacher: backbone at 1e-6, head at 1e-4
        head = {id(p) for p in classifier_head(net).parameters()}
        groups = [{"params": [p for p in net.parameters() if id(p) not in head], "lr": cfg.lr, "name": "net"},
                  {"params": [p for p in net.parameters() if id(p) in head], "lr": cfg.head_lr, "name": "head"}]
    if loss is not None:
        if loss.dt is not None:
            groups.append({"params": list(loss.dt.parameters()), "lr": cfg.dt_lr, "name": "dt"})
        energy = [p for m in (loss.energy_knn, loss.energy_lat, loss.logit_energy_knn, loss.logit_energy_lat)
                  if m is not None for p in m.parameters()]
        if energy:  # energy terms' projectors and regressions (the reference's energy_rl ones): the DT projector's lr
            groups.append({"params": energy, "lr": cfg.dt_lr, "name": "energy"})
        clubs = [p for m in (loss.club_knn, loss.club_lat) if m is not None for p in m.parameters()]
        if clubs:
            groups.append({"params": clubs, "lr": cfg.club_lr, "name": "club"})
    return groups


def make_optimizer(net: nn.Module, loss: OALLoss | None, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The run's optimizer over the network and the loss's trained parts, each group at its own learning rate."""
    groups = _param_groups(net, loss, cfg)
    # Adam's fused kernel: 15-25% less time per step of fashion's ViT teacher on 2 cores (SGD's fused kernel
    # was no faster for the ResNet students: not used)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


@dataclass
class Loop:
    """How the training loop runs, not what it learns: the batch size, the seed of its shuffling and
    initialisation, where (`device`; or the `accelerator` a Ray Train worker prepared), DataLoader worker processes,
    whether an existing checkpoint is continued from, and a progress bar."""

    batch_size: int
    seed: int
    device: str = "auto"
    num_workers: int = 0
    resume: bool = True
    progress: bool = True
    accelerator: Accelerator | None = None


@dataclass
class OALTerms:
    """What the OAL student trains against beside its ID images: the loss (its KD and MICL terms), the frozen
    teacher it distils from, and the outlier sets its MICL terms read (k-NN embeddings, latent vectors, decoded
    pixel outliers normalised with `pixel_norm`, the benchmark's mean and std), `batch_size` of them per step."""

    loss: OALLoss
    teacher: nn.Module | None = None
    knn: torch.Tensor | None = None
    latent: torch.Tensor | None = None
    pixel: torch.Tensor | None = None
    pixel_norm: tuple[tuple[float, ...], tuple[float, ...]] = ((0.5,) * 3, (0.5,) * 3)
    batch_size: int = 128


def fit(
    net: nn.Module,
    train_set: Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    loop: Loop,
    terms: OALTerms | None = None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    on_epoch_end: Callable[[int, dict[str, float], Path], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> FitResult:
    """Train `net` on `train_set` as `loop` says; without `terms` this is plain cross-entropy (the teacher
    fine-tune, the base student), with them the OAL student's loss against its teacher and outliers.

    `on_epoch_end(epoch, metrics, checkpoint_path)` is called on every rank after each epoch (Ray Train
    uses it to report); `eval_fn(net)` adds validation metrics, after BatchNorm statistics are recomputed
    (`cfg.precise_bn`, see `recompute_bn_stats`). A checkpoint `out_dir/checkpoint.pt`
    is written atomically every `cfg.checkpoint_every` epochs and at the end; with `loop.resume` an
    existing one is continued from; `meta` is stored in it. `terms.pixel` (uint8 [N, C, S, S], see
    `load_pixel_outliers`) is normalised with `terms.pixel_norm` batch by batch, like the ID images.
    """
    batch_size, seed, num_workers, resume, progress = (loop.batch_size, loop.seed, loop.num_workers, loop.resume,
                                                       loop.progress)
    t = terms or OALTerms(None)  # type: ignore[arg-type]
    loss, teacher, knn_outliers, latent_outliers, pixel_outliers = t.loss, t.teacher, t.knn, t.latent, t.pixel
    pixel_norm, outlier_batch_size = t.pixel_norm, t.batch_size
    acc = loop.accelerator or make_accelerator(loop.device, cfg)
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT
    torch.manual_seed(seed)
    sampler: DistributedSampler = DistributedSampler(train_set, num_replicas=acc.num_processes, rank=acc.process_index,
                                 shuffle=True, seed=seed)
    loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        drop_last=single_last_batch(len(sampler), batch_size), pin_memory=acc.device.type == "cuda")
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum_steps)
    modules = Step(net, loss)
    optimizer = make_optimizer(net, loss, cfg)
    # Cosine annealing to 0 over every optimizer step of the run (each group from its own lr).
    # Not passed to `prepare`: Accelerate would step it once per process.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps_per_epoch * cfg.epochs)
    epochs = Epochs(acc, ckpt_path, cfg.epochs, what="model/loss", progress=progress, on_epoch_end=on_epoch_end,
                    checkpoint_every=cfg.checkpoint_every)
    best: dict[str, Any] | None = None  # the epoch with the best ID validation accuracy (OpenOOD's best.ckpt)
    if resume:
        def load(state: dict[str, Any]) -> None:
            modules.load_state_dict(state["modules"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])

        state = epochs.resume(load)
        best = state.get("best") if state else None
    model, optimizer, teacher, last = place(modules, optimizer, teacher, acc, cfg)
    raw = acc.unwrap_model(model)
    knn = knn_outliers.to(acc.device) if knn_outliers is not None else None
    lat = latent_outliers.to(acc.device) if latent_outliers is not None else None
    pix = pixel_outliers.to(acc.device) if pixel_outliers is not None else None
    pix_mean, pix_std = (torch.tensor(v, device=acc.device).view(1, -1, 1, 1) * 255 for v in pixel_norm)
    for epoch in epochs:
        model.train()
        sampler.set_epoch(epoch)
        # Outlier draws are seeded per (seed, epoch, rank) so that a resumed run draws the same ones.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + acc.process_index)
        for step, (x, y) in enumerate(epochs.batches(loader, f"epoch {epoch + 1}/{cfg.epochs}")):
            x, y = to_device(x, acc, last), y.to(acc.device, non_blocking=True)
            kb = lb = None
            n_out = min(outlier_batch_size, len(x))
            if knn is not None:
                kb = knn[torch.randperm(len(knn), generator=gen)[:n_out].to(acc.device)]  # (n_out, D_k)
            if lat is not None:
                lb = lat[torch.randperm(len(lat), generator=gen)[:n_out].to(acc.device)]  # (n_out, D_l)
            pb = None
            if pix is not None:
                raw_px = pix[torch.randperm(len(pix), generator=gen)[:n_out].to(acc.device)]  # (n_out, C, S, S)
                pb = to_device((raw_px.float() - pix_mean) / pix_std, acc, last)
            total, parts = train_step(acc, model, optimizer, scheduler, teacher, x, y, kb, lb,
                                      check=functools.partial(_check_finite, acc, epoch=epoch, step=step,
                                                              ckpt=ckpt_path), pixel=pb)
            epochs.add({**parts, "total": total})
            if step % 20 == 0 and not epochs.bar.disable:
                epochs.bar.set_postfix(loss=f"{float(total.detach()):.3f}")
        metrics = epochs.metrics(epoch, optimizer.param_groups[0]["lr"])
        recompute_bn_stats(raw.net, train_set, cfg.precise_bn, batch_size, acc, seed * 1_000_003 + epoch)
        if eval_fn is not None:
            metrics.update(eval_fn(raw.net))
        val_acc = metrics.get("val/id_accuracy")
        if val_acc is not None and (best is None or val_acc >= best["val/id_accuracy"]):  # ties: the later epoch
            best = {"epoch": epoch + 1, "val/id_accuracy": val_acc,
                    "net": {k: v.detach().cpu().clone() for k, v in raw.net.state_dict().items()}}
        epochs.end(metrics, lambda: {"modules": raw.state_dict(), "optimizer": optimizer.state_dict(),
                                     "scheduler": scheduler.state_dict(), "meta": meta or {}, "best": best})
    return epochs.result()


def _check_finite(acc: Accelerator, total: torch.Tensor, terms: dict[str, torch.Tensor], epoch: int, step: int,
                  ckpt: Path) -> None:
    bad = torch.tensor(0.0 if torch.isfinite(total.detach()) else 1.0, device=acc.device)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")  # every rank stops together, none hangs in all-reduce
    if bad.item() > 0:
        names = [k for k, v in terms.items() if not torch.isfinite(v.detach())] or ["total (on another rank)"]
        raise NonFiniteLossError(
            f"non-finite loss term(s) {', '.join(names)} at epoch {epoch + 1}, step {step + 1}; training stopped. "
            f"Last good checkpoint: '{ckpt}'" + ("" if ckpt.exists() else " (none written yet)"))


def load_checkpoint_net(path: str | Path, net: nn.Module, which: str = "last",
                        state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load the network weights of a `fit` checkpoint into `net`: those of its last epoch, or with `which="best"`
    those of the epoch with the best ID validation accuracy (the last where no validation ran). Returns the
    checkpoint's meta, with `epoch` set to the loaded epoch. `state`: the file's contents when the caller has
    read it already (a ViT-B/16 checkpoint is 1 GB with its optimizer state: read once)."""
    state = load_torch(path, "checkpoint") if state is None else state
    if not isinstance(state, dict) or "modules" not in state:
        raise ValueError(f"checkpoint '{path}' is not an OAL checkpoint (no 'modules' entry)")
    if which not in ("last", "best"):
        raise ValueError(f"which checkpoint: 'last' or 'best' (weights); got {which!r}")
    best = state.get("best") if which == "best" else None
    if best is not None:
        weights, epoch = best["net"], best["epoch"]
    else:
        weights = {k[len("net."):]: v for k, v in state["modules"].items() if k.startswith("net.")}
        epoch = state.get("epoch")
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"checkpoint '{path}' does not fit the network "
                         f"{state.get('meta', {}).get('arch', '?')}: {str(e).splitlines()[0]}") from None
    return {**state.get("meta", {}), "epoch": epoch}
