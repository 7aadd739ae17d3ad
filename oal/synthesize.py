"""Sharded latent outlier synthesis: the plan, one shard's work, and the manifest.

The work is cut into shards of `diffusion.shard_size` outliers. A shard's content depends only on
(seed, shard index), never on which process ran it or in what order, so shards can be computed by
any worker (Ray actors in `jobs/synthesize.py`), retried, and skipped when already present. Each
shard is written under a temporary name and renamed; the manifest is written last.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from oal import storage
from oal.config import DiffusionConfig
from oal.diffusion import (
    class_token_position,
    decode,
    encode_prompts,
    encode_with_outliers,
    load_model,
    model_id,
    reduce_latents,
    sample_latents,
    tokenize,
)
from oal.storage import load_torch, save_torch, write_json

log = logging.getLogger("oal.synthesize")
MANIFEST = "manifest.json"
VECTORS = "latent_vectors.pt"
IMAGES = "pixel_outliers.pt"  # diffusion.mode=pixel: every outlier decoded, uint8 [N, 3, H, W]


@dataclass(frozen=True)
class ShardSpec:
    index: int
    start: int  # index of the shard's first outlier in the whole run
    count: int
    seed: int

    @property
    def filename(self) -> str:
        return f"shard_{self.index:05d}.pt"


def plan_shards(num_outliers: int, shard_size: int, seed: int) -> list[ShardSpec]:
    return [ShardSpec(i, start, min(shard_size, num_outliers - start), seed * 100_003 + i)
            for i, start in enumerate(range(0, num_outliers, shard_size))]


class LatentSynthesizer:
    """Holds the diffusion model and the per-class conditioning; computes shards."""

    def __init__(self, cfg: DiffusionConfig, class_names: list[str], outliers: torch.Tensor,
                 device: str | torch.device = "cpu", model_seed: int = 0):
        if outliers.dim() != 3 or outliers.shape[0] != len(class_names):
            raise ValueError(f"outlier embeddings must be [C={len(class_names)}, M, E]; got {tuple(outliers.shape)}")
        self.cfg = cfg
        self.model = load_model(cfg, device, model_seed)
        if outliers.shape[-1] != self.model.cond_dim:
            raise ValueError(f"outlier embeddings are {outliers.shape[-1]}-d but {self.model.model_id}'s conditioning "
                             f"is {self.model.cond_dim}-d; project them first (the anchors stage does)")
        self.outliers = outliers.float()
        self.class_names = list(class_names)
        self.ids = tokenize(self.model, [cfg.prompt.format(c) for c in class_names])  # (C, L)
        self.uncond = encode_prompts(self.model, [""])  # (1, L, E)
        self.positions = torch.tensor([class_token_position(self.model, cfg.prompt, c) for c in class_names])

    def run(self, spec: ShardSpec, progress: tqdm | None = None) -> dict[str, Any]:
        c, m = self.outliers.shape[:2]
        gen = torch.Generator().manual_seed(spec.seed)
        ids = torch.arange(spec.start, spec.start + spec.count)
        classes = ids % c  # classes in turn (the reference draws one class at random per batch of 3)
        emb_ids = torch.randint(0, m, (spec.count,), generator=gen)
        lat, imgs = [], []
        for b in range(0, spec.count, self.cfg.batch_size):
            cls, eid = classes[b:b + self.cfg.batch_size], emb_ids[b:b + self.cfg.batch_size]
            if self.cfg.conditioning == "class":  # the ablation: the class's own prompt, no outlier in it
                cond = encode_prompts(self.model, [self.cfg.prompt.format(self.class_names[int(c)]) for c in cls])
            else:
                cond = encode_with_outliers(self.model, self.ids[cls], self.positions[cls],
                                            self.outliers[cls, eid])  # (B, L, E)
            uncond = self.uncond.expand(len(cls), -1, -1)
            x = sample_latents(self.model, cond, uncond, self.cfg, gen)  # (B, 4, h, w)
            lat.append(x.float().cpu())
            if self.cfg.mode == "pixel":
                imgs.append(decode(self.model, x).cpu())
            if progress is not None:
                progress.update(len(cls))
        latents = torch.cat(lat)  # (N, 4, h, w)
        finite = torch.isfinite(latents.flatten(1)).all(1)  # (N,)
        out = {"spec": asdict(spec), "latents": latents[finite].half(),
               "vectors": reduce_latents(latents[finite], self.cfg.reduction), "class_ids": classes[finite],
               "embedding_ids": emb_ids[finite], "dropped": int((~finite).sum())}
        if imgs:
            out["images"] = (torch.cat(imgs)[finite] * 255).round().to(torch.uint8)  # (N, 3, H, W), 8 bits a pixel
        return out


def shard_ok(path: Path) -> bool:
    """A shard is complete when it exists and loads (a crash mid-write leaves only a .tmp file)."""
    if not storage.exists(path):  # asked of the object store under an s3:// output_dir
        return False
    try:
        d = load_torch(path, "shard")
        return "vectors" in d
    except storage.CorruptFileError as e:
        log.warning("%s; moved aside to '%s', the shard will be redone", e, storage.uri(storage.move_aside(path, "corrupt")))
        return False


def synthesize(cfg: DiffusionConfig, class_names: list[str], outliers: torch.Tensor, out_dir: str | Path,
               seed: int, device: str | torch.device = "cpu", fingerprint: str = "",
               shards: Iterable[ShardSpec] | None = None, progress: bool = True, redo: bool = False) -> dict[str, Any]:
    """Single-process synthesis of every missing shard (`redo`: of every shard), then the vectors file and the
    manifest."""
    out = Path(out_dir)
    plan = list(shards) if shards is not None else plan_shards(cfg.num_outliers, cfg.shard_size, seed)
    todo = plan if redo else [s for s in plan if not shard_ok(out / s.filename)]
    log.info("latent synthesis: %d of %d shards to do", len(todo), len(plan))
    t0, done = time.perf_counter(), 0
    if todo:
        synth = LatentSynthesizer(cfg, class_names, outliers, device, seed)
        with tqdm(total=sum(s.count for s in todo), desc="latent outliers", unit="outlier",
                  disable=not progress, dynamic_ncols=True) as bar:
            for spec in todo:
                save_torch(synth.run(spec, bar), out / spec.filename)
                done += spec.count
    seconds = time.perf_counter() - t0
    if done:
        log.info("latent synthesis: %d outliers in %.1f s (%.2f outliers/s)", done, seconds, done / seconds)
    return finalize(cfg, plan, out, seed, model_id(cfg, seed), fingerprint)


def finalize(cfg: DiffusionConfig, plan: list[ShardSpec], out: Path, seed: int, model_id: str,
             fingerprint: str) -> dict[str, Any]:
    """Check every shard is present exactly once, write the vectors file, then the manifest (last)."""
    missing = [s.filename for s in plan if not storage.exists(out / s.filename)]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) missing in '{out}': {', '.join(missing[:5])}")
    shards = [load_torch(out / s.filename, "shard") for s in plan]
    for s, d in zip(plan, shards):
        if d["spec"]["index"] != s.index or d["spec"]["seed"] != s.seed:
            raise RuntimeError(f"shard '{out / s.filename}' belongs to another plan; delete it and re-run")
    vectors = torch.cat([d["vectors"] for d in shards])  # (N, w)
    dropped = sum(d["dropped"] for d in shards)
    total = sum(s.count for s in plan)
    if dropped > cfg.max_nonfinite_fraction * total:
        raise RuntimeError(f"{dropped} of {total} latents were NaN/inf (more than diffusion.max_nonfinite_fraction="
                           f"{cfg.max_nonfinite_fraction}); try diffusion.dtype=fp32 or bf16")
    if dropped:
        log.warning("dropped %d non-finite latents of %d", dropped, total)
    save_torch({"outliers": vectors}, out / VECTORS)
    images_file, image_shape = None, None
    if cfg.mode == "pixel":
        if any("images" not in d for d in shards):
            raise RuntimeError(f"diffusion.mode=pixel but some shards in '{out}' were sampled without decoding; "
                               f"delete them and re-run")
        images = torch.cat([d["images"] for d in shards])  # (N, 3, H, W) uint8
        save_torch({"images": images}, out / IMAGES)
        images_file, image_shape = IMAGES, list(images.shape[1:])
    lat_shape = list(shards[0]["latents"].shape[1:]) if len(shards[0]["latents"]) else []
    manifest = {"count": int(len(vectors)), "requested": total, "dropped_nonfinite": dropped,
                "vector_shape": list(vectors.shape), "latent_shape": lat_shape, "dtype": {"latents": "float16",
                "vectors": "float32"}, "model_id": model_id, "untrained_model": "untrained" in model_id,
                "seed": seed, "shard_seeds": [s.seed for s in plan], "shards": [s.filename for s in plan],
                "reduction": cfg.reduction, "scheduler": cfg.scheduler, "steps": cfg.steps,
                "guidance_scale": cfg.guidance_scale, "fingerprint": fingerprint, "vectors_file": VECTORS,
                "mode": cfg.mode, "images_file": images_file, "image_shape": image_shape}
    write_json(manifest, out / MANIFEST)
    return manifest
