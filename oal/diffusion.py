"""Latent outlier synthesis with a diffusion model, never decoded for training.

One code path serves (a) the built-in tiny model, built offline from configs with seeded random
weights (UNTRAINED: it exercises the machinery, its samples mean nothing), and (b) any Stable
Diffusion in diffusers format, from a local folder or a hub id.

Conditioning, as the reference does it: the prompt "A high-quality image of the {class}" is tokenised by
the model's own tokenizer; the text encoder's *input* token embedding at the class name's *first*
sub-token is replaced by one outlier embedding, and the whole text transformer runs on that, so every
later position (end-of-text and padding included) carries the outlier. The unconditional prompt is
encoded unchanged. A class's anchor is the mean over positions of the encoder output for the bare class
name; the k-NN outliers are scaled to its norm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from oal.config import DiffusionConfig
from oal.text_encoder import WordTokenizer, tiny_text_encoder

log = logging.getLogger("oal.diffusion")
BUILTIN = "builtin-tiny"  # untrained, random weights: exercises the machinery
BUILTIN_LDM = "builtin-ldm"  # the built-in model trained on the ID data by the diffusion stage (oal.ldm)
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _tokens(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` alone, without start/end/padding."""
    if isinstance(tokenizer, WordTokenizer):
        return tokenizer.word_ids(text)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class DiffusionModel:
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any
    scheduler_config: dict
    model_id: str
    untrained: bool
    device: torch.device
    dtype: torch.dtype

    @property
    def cond_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_size(self, resolution: int | None) -> int:
        if resolution is None:
            return int(self.unet.config.sample_size)
        if resolution % self.vae_factor:
            raise ValueError(f"diffusion.resolution={resolution} must be a multiple of the VAE factor {self.vae_factor}")
        return resolution // self.vae_factor


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def build_tiny(seed: int = 0) -> tuple[Any, Any, Any, WordTokenizer, dict]:
    """The built-in tiny model: UNet (4x8x8 latents), VAE (16x16 pixels), 2-layer CLIP text encoder (32-d)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16)
    text, tok = tiny_text_encoder()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return unet, vae, text, tok, dict(sched.config)  # type: ignore[attr-defined]


def model_id(cfg: DiffusionConfig, seed: int) -> str:
    """How the model is named in every log, manifest and run: the built-in one says it is untrained."""
    if cfg.model == BUILTIN:
        return f"{BUILTIN} (untrained, random weights, seed {seed})"
    if cfg.model == BUILTIN_LDM:
        return f"{BUILTIN_LDM} (trained on the ID training images by the diffusion stage: {cfg.checkpoint})"
    return cfg.model


def load_model(cfg: DiffusionConfig, device: str | torch.device = "cpu", seed: int = 0) -> DiffusionModel:
    """The built-in tiny model, or a Stable Diffusion from a local diffusers folder or a hub id."""
    device = torch.device(device)
    dtype = _dtype(cfg.dtype, device)
    if cfg.model == BUILTIN:
        unet, vae, text, tok, sched = build_tiny(seed)
        log.warning("diffusion model: %s - its latents exercise the pipeline only", model_id(cfg, seed))
    elif cfg.model == BUILTIN_LDM:
        from oal import ldm

        if cfg.checkpoint is None:
            raise ValueError(f"diffusion.model={BUILTIN_LDM} needs the diffusion stage's checkpoint (diffusion.checkpoint; "
                             f"the pipeline fills it in)")
        unet, vae, text, tok, sched = ldm.load_trained(cfg.checkpoint)
    else:
        unet, vae, text, tok, sched = _load_diffusers(cfg.model, dtype)
    for m in (unet, vae, text):
        m.to(device)
        if next(m.parameters()).dtype != dtype:
            m.to(dtype)
        m.eval().requires_grad_(False)
    unet = prepare_unet(unet, vae, cfg.compile)
    return DiffusionModel(unet, vae, text, tok, sched, model_id(cfg, seed), cfg.model == BUILTIN, device, dtype)


def prepare_unet(unet: Any, vae: Any, compile_mode: str = "off") -> Any:
    """Scaled-dot-product attention (`F.scaled_dot_product_attention`: flash or memory-efficient kernels on a GPU)
    in every attention layer of the UNet and the VAE, set explicitly rather than left to diffusers' default; then,
    with `compile_mode` (diffusion.compile) other than off, the UNet through torch.compile (the first sampling call
    compiles; later calls of the same batch shape reuse it). Returns the UNet to sample with."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for m in (unet, vae):
        if getattr(m, "attn_processors", None):
            m.set_attn_processor(AttnProcessor2_0())
    if compile_mode == "off":
        return unet
    return torch.compile(unet, mode=compile_mode)


def _load_diffusers(name: str, dtype: torch.dtype) -> tuple:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(name).is_dir()
    if local:
        missing = [c for c in COMPONENTS if not (Path(name) / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"diffusers folder '{name}' lacks component folder(s) {', '.join(missing)}; "
                                    f"expected {', '.join(COMPONENTS)} (diffusion.model)")
    elif Path(name).exists() or name.startswith(("/", ".")):
        raise FileNotFoundError(f"diffusion.model '{name}' is not a diffusers folder")
    from diffusers import DDIMScheduler

    unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", torch_dtype=dtype, local_files_only=local)
    vae = AutoencoderKL.from_pretrained(name, subfolder="vae", torch_dtype=dtype, local_files_only=local)
    text = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", torch_dtype=dtype, local_files_only=local)
    tok = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", local_files_only=local)
    sched = DDIMScheduler.from_pretrained(name, subfolder="scheduler", local_files_only=local).config
    return unet, vae, text, tok, dict(sched)


def make_scheduler(name: str, base_config: dict):
    """A fresh scheduler of the chosen kind (PNDM keeps state between steps: one per sampling call)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(base_config)
    if name == "pndm":
        return PNDMScheduler.from_config(base_config, skip_prk_steps=True)  # PLMS
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(base_config, algorithm_type="dpmsolver++")
    raise ValueError(f"unknown scheduler '{name}' (diffusion.scheduler): ddim | pndm | dpm")


# ---- conditioning ----------------------------------------------------------------------------------

@torch.no_grad()
def encode_prompts(model: DiffusionModel, prompts: list[str]) -> torch.Tensor:
    """Text encoder output for each prompt: (B, L, E)."""
    tok = model.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")["input_ids"].to(model.device)
    return model.text_encoder(ids)[0].to(model.dtype)  # (B, L, E)


def tokenize(model: DiffusionModel, prompts: list[str]) -> torch.Tensor:
    """Token ids of each prompt, padded to the tokenizer's length as Stable Diffusion pipelines do: (B, L)."""
    tok = model.tokenizer
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt")["input_ids"]


def name_tokens(model: DiffusionModel, class_name: str) -> list[int]:
    """The class name's token ids; a name the tokenizer turns into nothing cannot be conditioned on."""
    name = _tokens(model.tokenizer, class_name)
    if not name:
        raise ValueError(f"the tokenizer of diffusion.model splits class name {class_name!r} into no tokens: "
                         f"nothing to condition on; expected at least one token (rename the class, or use a "
                         f"tokenizer whose vocabulary covers it)")
    return name


def class_token_position(model: DiffusionModel, prompt_template: str, class_name: str) -> int:
    """Index, in the tokenised prompt, of the class name's first sub-token (the row the reference overwrites)."""
    prefix = _tokens(model.tokenizer, prompt_template.split("{}")[0].strip())
    name = name_tokens(model, class_name)
    pos = 1 + len(prefix)  # 1 for the start token
    if pos >= model.tokenizer.model_max_length - 1:
        raise ValueError(f"prompt for {class_name!r} is longer than the tokenizer's {model.tokenizer.model_max_length}")
    full = [model.tokenizer.bos_token_id, *_tokens(model.tokenizer, prompt_template.format(class_name))]
    if full[pos] != name[0]:
        raise ValueError(f"cannot locate the class token of {class_name!r} in the prompt {prompt_template!r}: "
                         f"the tokenizer splits it differently in context")
    return pos


@torch.no_grad()
def encode_with_outliers(model: DiffusionModel, ids: torch.Tensor, positions: torch.Tensor,
                         embeddings: torch.Tensor) -> torch.Tensor:
    """Text encoder output (B, L, E) of token ids (B, L) whose *input* token embedding at positions[b] is
    replaced by embeddings[b] (B, E) before the transformer runs (the reference's conditioning). The encoder's
    weights are never changed: a forward hook rewrites the embedding layer's output for this call only."""
    layer = model.text_encoder.get_input_embeddings()
    rows = torch.arange(len(ids), device=model.device)

    def overwrite(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()  # (B, L, E_in)
        out[rows, positions.to(model.device)] = embeddings.to(out.device, out.dtype)
        return out

    handle = layer.register_forward_hook(overwrite)
    try:
        return model.text_encoder(ids.to(model.device))[0].to(model.dtype)  # (B, L, E)
    finally:
        handle.remove()


@torch.no_grad()
def class_anchors(model: DiffusionModel, class_names: list[str], prompt_template: str | None = None) -> torch.Tensor:
    """Anchor of each class, as the reference computes it: the text encoder's output for the bare class name
    (start, name, end and padding tokens), averaged over positions: (C, E). Only its norm is used (the scale
    of the k-NN outliers) and, where the teacher's width differs, its direction (the projection's target)."""
    for c in class_names:
        name_tokens(model, c)
    cond = encode_prompts(model, list(class_names))  # (C, L, E)
    return cond.float().mean(dim=1).cpu()  # (C, E)


@torch.no_grad()
def token_embedding_norms(model: DiffusionModel, class_names: list[str]) -> torch.Tensor:
    """Norm of each class name's first sub-token's row in the text encoder's input embedding: (C,)."""
    rows = model.text_encoder.get_input_embeddings().weight  # (V, E)
    ids = torch.tensor([name_tokens(model, c)[0] for c in class_names], device=rows.device)
    return rows[ids].float().norm(dim=-1).cpu()  # (C,)


# ---- sampling --------------------------------------------------------------------------------------

@torch.no_grad()
def sample_latents(model: DiffusionModel, cond: torch.Tensor, uncond: torch.Tensor, cfg: DiffusionConfig,
                   generator: torch.Generator) -> torch.Tensor:
    """Classifier-free-guided sampling in latent space: cond/uncond (B, L, E) -> latents (B, 4, h, w)."""
    sched = make_scheduler(cfg.scheduler, model.scheduler_config)
    sched.set_timesteps(cfg.steps, device=model.device)
    size = model.latent_size(cfg.resolution)
    shape = (len(cond), model.latent_channels, size, size)
    latents = torch.randn(shape, generator=generator).to(model.device, model.dtype) * sched.init_noise_sigma
    both = torch.cat([uncond, cond])  # (2B, L, E)
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([latents, latents]), t)  # (2B, 4, h, w)
        eps_u, eps_c = model.unet(inp, t, encoder_hidden_states=both).sample.chunk(2)
        eps = eps_u + cfg.guidance_scale * (eps_c - eps_u)  # guidance: push away from the unconditional
        latents = sched.step(eps, t, latents).prev_sample
    return latents  # (B, 4, h, w), unscaled (divide by vae.config.scaling_factor to decode)


def reduce_latents(latents: torch.Tensor, how: str = "channel_row_mean") -> torch.Tensor:
    """Latents (B, 4, h, w) -> vectors. Reference: mean over channels (B, h, w), then over rows (B, w)."""
    x = latents.float()
    if how == "channel_row_mean":
        return x.mean(1).mean(1)  # (B, w)
    if how == "channel_mean":
        return x.mean(1).flatten(1)  # (B, h*w)
    if how == "flatten":
        return x.flatten(1)  # (B, 4*h*w)
    raise ValueError(f"unknown reduction '{how}' (diffusion.reduction)")


@torch.no_grad()
def decode(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1]: (B, 3, H, W). For looking at outliers and for the pixel-space comparison only."""
    x = model.vae.decode(latents.to(model.dtype) / model.vae.config.scaling_factor).sample
    return ((x.float() + 1) / 2).clamp(0, 1)


# ---- teacher space -> conditioning space -----------------------------------------------------------

class AnchorProjection(nn.Module):
    """Maps teacher features (D) into the conditioning space (E) so that each class's features align
    with its anchor: trained with cross-entropy over cosine similarity to the anchors (temperature 0.1).
    Identity when D == E."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.linear = nn.Linear(in_dim, out_dim) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.linear is None else self.linear(x)


def fit_projection(embeddings: torch.Tensor, anchors: torch.Tensor, steps: int, seed: int) -> tuple[AnchorProjection, float]:
    """Learn the projection from ID embeddings [C, N, D] to anchors [C, E]; returns it and its accuracy
    (fraction of embeddings whose nearest anchor, by cosine, is their own class's)."""
    c, n, d = embeddings.shape
    if anchors.shape[0] != c:
        raise ValueError(f"{anchors.shape[0]} class anchors for {c} classes of ID embeddings: the class list "
                         f"does not match the benchmark")
    proj = AnchorProjection(d, anchors.shape[1])
    x = embeddings.reshape(-1, d).float()  # (C*N, D)
    y = torch.arange(c).repeat_interleave(n)  # (C*N,)
    a = nn.functional.normalize(anchors.float(), dim=-1)  # (C, E)
    if proj.linear is not None:
        torch.manual_seed(seed)
        nn.init.orthogonal_(proj.linear.weight)
        opt = torch.optim.Adam(proj.parameters(), lr=1e-2)
        for _ in range(steps):
            logits = nn.functional.normalize(proj(x), dim=-1) @ a.T / 0.1  # (C*N, C)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float(((nn.functional.normalize(proj(x), dim=-1) @ a.T).argmax(-1) == y).float().mean())
    return proj.requires_grad_(False), acc


@torch.no_grad()
def class_conditional_accuracy(model: Any, classifier: nn.Module, class_names: list[str], cfg: DiffusionConfig,
                               per_class: int, seed: int, image_size: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Sample `per_class` images of each class's prompt (classifier-free guidance, the synthesis settings of
    `cfg`), decode them and let `classifier` (the fine-tuned teacher, its inputs normalised to [-1, 1]) name the
    class. Returns {accuracy, per_class} and the decoded images (C, per_class, 3, H, W) in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    conds = encode_prompts(model, [cfg.prompt.format(c) for c in class_names])  # (C, L, E)
    uncond = encode_prompts(model, [""])  # (1, L, E)
    classifier = classifier.to(model.device).eval()
    images, correct = [], []
    for c in range(len(class_names)):
        imgs = []
        for b in range(0, per_class, cfg.batch_size):
            k = min(cfg.batch_size, per_class - b)
            lat = sample_latents(model, conds[c:c + 1].expand(k, -1, -1), uncond.expand(k, -1, -1), cfg, gen)
            imgs.append(decode(model, lat).float())  # (k, 3, H, W) in [0, 1]
        x = torch.cat(imgs)
        if x.shape[-1] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        logits = classifier((x - 0.5) / 0.5)[0]  # (per_class, C): back to the model's [-1, 1] input space
        correct.append((logits.argmax(-1) == c).float().mean().item())
        images.append(x.cpu())
    return ({"accuracy": sum(correct) / len(correct), "per_class": dict(zip(class_names, correct))},
            torch.stack(images))
