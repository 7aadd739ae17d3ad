"""Outlier synthesis throughput: latent-only sampling (what OAL trains on) against sampling plus VAE decoding.

    python -m bench.synthesis [--steps 20] [--batch 8] [--reps 3] [--device auto] [--sd-size]

Both modes use the same model, conditioning, sampler settings and seeds, in one process, timed in
alternating (ABBA) order after one warm-up call each, so the ratio is meaningful on a busy machine.
Default model: the built-in tiny one (untrained). `--sd-size` builds a UNet, VAE and text encoder with
Stable Diffusion v1's shapes and random weights (no download), 512x512 pixels / 64x64 latents, fp16 on
CUDA; random weights cost the same time as trained ones.

Peak memory of a mode, measured by running it once after the model is loaded:
- CUDA: `torch.cuda.max_memory_allocated()` minus the allocation before the call (stats reset per mode).
- CPU: the kernel's resident-set high-water mark (VmHWM, reset by writing 5 to /proc/self/clear_refs) minus
  the resident set before the call, in a fresh process per mode: in one process, memory freed by the first
  mode stays mapped by the allocator and would hide the second mode's need. Where clear_refs is not
  available, a thread samples the resident set every millisecond instead (it can miss short peaks).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from oal.config import DiffusionConfig
from oal.diffusion import (
    DiffusionModel,
    WordTokenizer,
    decode,
    encode_prompts,
    load_model,
    reduce_latents,
    sample_latents,
)

MODES = ("latent", "decode")
LABELS = {"latent": "latent only", "decode": "latent + VAE decode"}
CLASSES = ("zero", "one", "two", "three", "four", "five")  # the digits benchmark's ID classes


@dataclass(frozen=True)
class Spec:
    """Everything needed to rebuild the same model and inputs in another process."""

    sd_size: bool
    tiny_check: bool
    device: str
    dtype: str  # fp32 | fp16 | bf16
    steps: int
    batch: int
    resolution: int | None
    threads: int
    seed: int = 0


def _sd_v1_sized(tiny: bool, latent_size: int, seed: int) -> tuple:
    """UNet, VAE and CLIP text encoder with SD v1's configs (random weights); `tiny` keeps the block structure
    (4 levels, 2 layers per block, cross-attention in the first 3) at small widths, to check the path on CPU."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet_w, vae_w, text_d = ((32, 32, 64, 64), (32, 32, 64, 64), 64) if tiny else \
        ((320, 640, 1280, 1280), (128, 256, 512, 512), 768)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=unet_w, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=text_d, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=vae_w, layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=32, sample_size=latent_size * 8, scaling_factor=0.18215)
    # CLIP's BPE vocabulary files cannot be fetched here; the hashing tokenizer has CLIP ViT-L/14's sizes.
    tok = WordTokenizer(vocab_size=49408, model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=tok.vocab_size, hidden_size=text_d, intermediate_size=4 * text_d,
        num_hidden_layers=2 if tiny else 12, num_attention_heads=4 if tiny else 12,
        max_position_embeddings=tok.model_max_length, projection_dim=text_d, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=1, pad_token_id=2))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return unet, vae, text, tok, dict(sched.config)  # type: ignore[attr-defined]


def build(spec: Spec) -> tuple[DiffusionModel, DiffusionConfig, torch.Tensor, torch.Tensor]:
    """The model, its sampling config, and the conditioning (cond, uncond), each (B, L, E)."""
    torch.set_num_threads(spec.threads)
    logging.getLogger("oal.diffusion").setLevel(logging.ERROR)  # the table itself says the model is untrained
    dcfg = DiffusionConfig(steps=spec.steps, batch_size=spec.batch, resolution=spec.resolution, dtype=spec.dtype)
    if spec.sd_size:
        latent = (spec.resolution or (64 if spec.tiny_check else 512)) // 8
        unet, vae, text, tok, sched = _sd_v1_sized(spec.tiny_check, latent, spec.seed)
        device = torch.device(spec.device)
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.dtype]
        from diffusers.utils import logging as diffusers_logging

        # Casting with .to() warns about modules to keep in fp32; these configs have none (the list it prints is empty).
        diffusers_logging.set_verbosity_error()
        for m in (unet, vae, text):
            m.to(device, dtype).eval().requires_grad_(False)
        name = "SD-v1-sized" + (" (tiny-check widths)" if spec.tiny_check else "")
        model = DiffusionModel(unet, vae, text, tok, sched, f"{name}, random weights", True, device, dtype)
    else:
        model = load_model(dcfg, spec.device, spec.seed)
    prompts = [dcfg.prompt.format(CLASSES[i % len(CLASSES)]) for i in range(spec.batch)]
    cond = encode_prompts(model, prompts)  # (B, L, E)
    uncond = encode_prompts(model, [""]).expand(spec.batch, -1, -1)  # (B, L, E)
    return model, dcfg, cond, uncond


def _sync(model: DiffusionModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def run_once(model: DiffusionModel, dcfg: DiffusionConfig, cond: torch.Tensor, uncond: torch.Tensor, mode: str,
             seed: int) -> tuple[float, float]:
    """One batch of outliers as the synthesis shard loop makes them; returns (sampling s, decoding s)."""
    gen = torch.Generator().manual_seed(seed)
    _sync(model)
    t0 = time.perf_counter()
    lat = sample_latents(model, cond, uncond, dcfg, gen)  # (B, 4, h, w)
    reduce_latents(lat.float().cpu())  # the training vectors; the .cpu() copy also waits for the GPU
    t1 = time.perf_counter()
    if mode == "decode":
        decode(model, lat).cpu()  # (B, 3, H, W)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


# ---- peak memory -----------------------------------------------------------------------------------

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    assert m is not None, field
    return int(m.group(1))


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def _cpu_peak_child(spec: Spec, mode: str) -> tuple[float, str]:
    """In a fresh process: peak resident-set growth (MiB) while running `mode` once, and the method used."""
    import psutil

    model, dcfg, cond, uncond = build(spec)
    proc = psutil.Process()
    base = proc.memory_info().rss
    if _reset_hwm():
        run_once(model, dcfg, cond, uncond, mode, spec.seed)
        return (_status_kib("VmHWM") * 1024 - base) / 2**20, "VmHWM"
    peak, stop = [base], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    run_once(model, dcfg, cond, uncond, mode, spec.seed)
    stop.set()
    t.join()
    return (max(peak[0], proc.memory_info().rss) - base) / 2**20, "psutil RSS sampling (1 ms)"


def peak_memory(spec: Spec, model: DiffusionModel, dcfg: DiffusionConfig, cond: torch.Tensor,
                uncond: torch.Tensor) -> tuple[dict[str, float], str]:
    """Peak extra memory (MiB) of each mode, and how it was measured."""
    out, method = {}, ""
    for mode in MODES:
        if model.device.type == "cuda":
            _sync(model)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(model.device)
            base = torch.cuda.memory_allocated(model.device)
            run_once(model, dcfg, cond, uncond, mode, spec.seed)
            out[mode] = (torch.cuda.max_memory_allocated(model.device) - base) / 2**20
            method = "torch.cuda.max_memory_allocated above the allocation before the call"
        else:
            with mp.get_context("spawn").Pool(1) as pool:  # a fresh process per mode (see the module doc)
                out[mode], how = pool.apply(_cpu_peak_child, (spec, mode))
            method = f"peak resident-set growth in a fresh process per mode ({how})"
    return out, method


# ---- main ------------------------------------------------------------------------------------------

def _params(m: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.synthesis", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="denoising steps (DDIM)")
    p.add_argument("--batch", type=int, default=8, help="outliers per sampler call")
    p.add_argument("--reps", type=int, default=5, help="timed calls per mode, after one warm-up each")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    p.add_argument("--sd-size", action="store_true", help="Stable Diffusion v1 sized model, random weights, 512x512")
    p.add_argument("--resolution", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tiny-check", action="store_true", help=argparse.SUPPRESS)  # SD structure, small widths (CPU)
    args = p.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    if args.sd_size and device != "cuda" and not args.tiny_check:
        p.error("--sd-size needs a CUDA device (an SD-sized UNet at 512x512 takes minutes per step batch on CPU)")
    dtype = args.dtype if args.dtype != "auto" else ("fp16" if device == "cuda" else "fp32")
    spec = Spec(args.sd_size, args.tiny_check, device, dtype, args.steps, args.batch, args.resolution, args.threads)
    model, dcfg, cond, uncond = build(spec)
    t_start = time.perf_counter()
    for mode in MODES:
        run_once(model, dcfg, cond, uncond, mode, spec.seed)  # warm-up: lazy init, kernel selection
    sampling: dict[str, list[float]] = {m: [] for m in MODES}
    total: dict[str, list[float]] = {m: [] for m in MODES}
    decoding: list[float] = []
    for r in range(args.reps):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):  # ABBA
            ts, td = run_once(model, dcfg, cond, uncond, mode, spec.seed + 1 + r)
            sampling[mode].append(ts)
            total[mode].append(ts + td)
            if mode == "decode":
                decoding.append(td)
        print(f"  rep {r + 1}/{args.reps} done", file=sys.stderr, flush=True)
    mem, mem_method = peak_memory(spec, model, dcfg, cond, uncond)
    per_call = {m: statistics.median(v) for m, v in total.items()}
    rate = {m: args.batch / per_call[m] for m in MODES}
    # Sampler steps per second; each step runs the UNet on 2B rows (classifier-free guidance).
    unet_its = {m: args.steps / statistics.median(v) for m, v in sampling.items()}
    pooled, med_decode = statistics.median(sampling["latent"] + sampling["decode"]), statistics.median(decoding)
    lat = model.latent_size(dcfg.resolution)
    px = lat * model.vae_factor
    dev_name = torch.cuda.get_device_name(model.device) if device == "cuda" else f"CPU, {args.threads} torch thread(s)"
    lines = [
        "# Outlier synthesis: latent-only vs latent + VAE decode",
        "",
        f"Model: {model.model_id}"
        + (" - the built-in UNTRAINED tiny model" if model.untrained and not args.sd_size else "")
        + f" (UNet {_params(model.unet)}, VAE {_params(model.vae)}, text encoder {_params(model.text_encoder)} params); "
        f"{dtype} on {dev_name}.",
        f"DDIM {args.steps} steps, guidance {dcfg.guidance_scale}, batch {args.batch}, latents 4x{lat}x{lat} "
        f"({px}x{px} pixels). Median of {args.reps} timed calls per mode, ABBA order, after one warm-up each.",
        "",
        "| mode | outliers/s | s per batch | UNet it/s | peak extra memory (MiB) |",
        "|---|---|---|---|---|",
    ]
    for m in MODES:
        lines.append(f"| {LABELS[m]} | {rate[m]:.2f} | {per_call[m]:.3f} | {unet_its[m]:.2f} | {mem[m]:.1f} |")
    lines += [
        "",
        f"Ratio latent-only / with decode: {rate['latent'] / rate['decode']:.2f}x outliers/s measured; "
        f"{(pooled + med_decode) / pooled:.2f}x from its parts (sampling, the same work in both modes, pooled "
        f"over both: {pooled:.3f} s; decode {med_decode:.3f} s = {100 * med_decode / (pooled + med_decode):.1f}% "
        "of a decode-mode batch). Read the second where the two differ: it is not hit by the noise between calls.",
        f"Peak memory ratio (decode / latent): {mem['decode'] / max(mem['latent'], 1e-9):.2f}x.",
        f"UNet it/s = sampler steps per second at batch {args.batch} (2x{args.batch} UNet rows per step: "
        "classifier-free guidance), sampling time only.",
        f"Memory: {mem_method}.",
        f"Runtime: {time.perf_counter() - t_start:.0f} s (after model build).",
        "",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
