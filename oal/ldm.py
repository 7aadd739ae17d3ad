"""The built-in latent diffusion model (`diffusion.model=builtin-ldm`), trained on the ID training images by the
`diffusion` stage, so that offline runs synthesise outliers from a model that has learnt something.

It has Stable Diffusion's three parts, small: an autoencoder (diffusers `AutoencoderKL`, 4 latent channels,
factor 4: 32 px images -> 4x8x8 latents), a text-conditioned UNet (`UNet2DConditionModel`: cross-attention on
the text encoder's output, and the attention-pooled output added to the time embedding) and a CLIP text
encoder (`CLIPTextModel`, the built-in word tokenizer). Stable Diffusion's CLIP comes trained and stays
frozen; ours starts from seeded random weights, under which the six prompts differ too little for the UNet
to follow them in a few hundred CPU steps, so by default it learns with the UNet, as latent diffusion's own
text transformer did (`ldm.train_text_encoder`). Training, as latent diffusion trains: first the autoencoder
(reconstruction + a small KL term), then the UNet (and the text encoder) on the scaled latents of the
training images (epsilon prediction, Stable Diffusion's DDPM noise schedule), with the prompt "A
high-quality image of the {class}" and, for `ldm.cond_dropout` of the images, the empty prompt
(classifier-free guidance). Anchors, outlier conditioning and sampling then run exactly as with Stable
Diffusion (`oal.diffusion`).

Its quality is measured, not assumed: `class_conditional_accuracy` samples each class's prompt and asks the
fine-tuned teacher which class it sees.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from oal.config import LDMConfig
from oal.epochs import CHECKPOINT, Epochs, FitResult
from oal.storage import load_torch
from oal.train import make_accelerator

NAME = "builtin-ldm"
VAE_FACTOR = 4


def build(image_size: int, seed: int, scaling_factor: float = 1.0) -> tuple[Any, Any, Any, Any, dict]:
    """Untrained parts, seeded: UNet (4 x s/4 x s/4 latents), VAE (s px), text encoder and tokenizer, scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from oal.text_encoder import tiny_text_encoder

    if image_size % VAE_FACTOR:
        raise ValueError(f"builtin-ldm works on images whose side is a multiple of {VAE_FACTOR}; data.image_size is "
                         f"{image_size}")
    text, tok = tiny_text_encoder(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=image_size, scaling_factor=scaling_factor)
    unet = UNet2DConditionModel(sample_size=image_size // VAE_FACTOR, in_channels=4, out_channels=4,
                                block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=text.config.hidden_size, attention_head_dim=8, norm_num_groups=8,
                                # the prompt also enters every ResNet block through the time embedding (attention-
                                # pooled text, as SDXL and Kandinsky add theirs): class conditioning appears in
                                # hundreds of CPU steps instead of thousands (15% -> 50% class accuracy at 400 -> 800
                                # steps in a probe, where cross-attention alone stayed near chance)
                                addition_embed_type="text", addition_embed_type_num_heads=4)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return unet, vae, text, tok, dict(sched.config)  # type: ignore[attr-defined]


def load_trained(path: str | Path) -> tuple[Any, Any, Any, Any, dict]:
    """The parts of a model the diffusion stage trained (its checkpoint's last epoch)."""
    state = load_torch(path, "builtin-ldm checkpoint")
    meta = state.get("meta", {})
    if meta.get("kind") != NAME or state.get("scaling_factor") is None:
        raise ValueError(f"'{path}' is not a finished builtin-ldm checkpoint of the diffusion stage (diffusion.model="
                         f"{NAME}); run the diffusion stage (`oal diffusion`) first")
    unet, vae, text, tok, sched = build(meta["image_size"], meta["seed"], state["scaling_factor"])
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        module.load_state_dict(state["modules"][name])
    return unet, vae, text, tok, sched


class _VAEStep(nn.Module):
    """Autoencoder loss in one forward (so DDP syncs it): reconstruction MSE + kl_weight * KL to N(0, I)."""

    def __init__(self, vae: Any, kl_weight: float):
        super().__init__()
        self.vae: Any = vae
        self.kl_weight = kl_weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.sample()).sample  # (B, 3, H, W)
        mse, kl = F.mse_loss(rec, x), post.kl().mean() / x[0].numel()
        return mse + self.kl_weight * kl, {"reconstruction": mse, "kl": kl}


class _UNetStep(nn.Module):
    """Epsilon-prediction loss of the UNet on noised latents, conditioned on the text encoder's output for each
    image's prompt (`prompt_ids` row `cls[b]`); the text encoder learns with the UNet unless it is frozen."""

    def __init__(self, unet: Any, text: Any, prompt_ids: torch.Tensor, train_text: bool):
        super().__init__()
        self.unet: Any = unet
        self.text: Any = text.requires_grad_(train_text)
        self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        self.train_text = train_text

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, cls: torch.Tensor, noise: torch.Tensor,
                weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            conds = self.text(self.prompt_ids)[0]  # (C + 1, L, E)
        # index_select, not conds[cls]: the backward of advanced indexing accumulates repeated rows with
        # index_put_(accumulate=True), whose order on a CPU with several threads varies from run to run (PyTorch lists
        # it among the nondeterministic ops); index_select's backward adds them in index order.
        err = F.mse_loss(self.unet(noisy, t, encoder_hidden_states=conds.index_select(0, cls)).sample, noise,
                         reduction="none").mean(dim=(1, 2, 3))  # (B,)
        mse = err.mean()
        return (mse if weight is None else (err * weight).mean()), {"noise_mse": mse}


def snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights of epsilon prediction (Hang et al., 2023): min(SNR(t), gamma) / SNR(t), so the
    nearly clean timesteps, whose noise is easy to guess, stop dominating the loss."""
    a = alphas_cumprod[t]
    snr = a / (1 - a)
    return torch.clamp(snr, max=gamma) / snr


class _WithIndex(Dataset):
    """(image, label, index): the UNet phase looks each image's latent up by its index."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = self.ds[i]
        return x, y, i


@torch.no_grad()
def _encode_all(vae: Any, images: Dataset, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image's latent: (N, 4, h, w) each, on CPU."""
    means, stds = [], []
    for x, _ in DataLoader(images, batch_size=batch_size):
        post = vae.encode(x.to(device)).latent_dist
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def fit_ldm(
    train_set: Dataset,
    class_names: list[str],
    prompt: str,
    image_size: int,
    cfg: LDMConfig,
    out_dir: str | Path,
    *,
    seed: int,
    device: str = "auto",
    on_epoch_end: Callable[[int, dict[str, float], Path], None] | None = None,
    meta: dict[str, Any] | None = None,
    resume: bool = True,
    progress: bool = True,
    accelerator: Accelerator | None = None,
) -> FitResult:
    """Train the autoencoder for `cfg.vae_epochs`, then the UNet for `cfg.epochs`, on `train_set` (images in
    [-1, 1], labels the class index). One checkpoint (`out_dir/checkpoint.pt`, written atomically every epoch)
    holds both phases; `on_epoch_end(epoch, metrics, checkpoint)` runs on every rank after each epoch (Ray Train
    reports there), epochs counted across both phases."""
    from diffusers import DDPMScheduler

    from oal.text_encoder import WordTokenizer

    acc = accelerator or make_accelerator(device, cfg)
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT
    torch.manual_seed(seed)
    unet, vae, text, tok, _ = build(image_size, seed)
    assert isinstance(tok, WordTokenizer)
    ids = tok([prompt.format(c) for c in class_names] + [""])["input_ids"]  # each class's prompt, then the empty one
    vae_step, unet_step = _VAEStep(vae, cfg.kl_weight), _UNetStep(unet, text, ids, cfg.train_text_encoder)
    if acc.device.type == "cpu":
        # The UNet's attention works on 16-64 tokens with heads of 4-8 channels: on a CPU, PyTorch's fused
        # scaled-dot-product kernel is slower than plain batched matmuls in the backward pass (the default
        # processor stays on a GPU, and for sampling, where the fused kernel is the faster one)
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    # Fused AdamW (one kernel over all parameters instead of a loop of small ops): with the attention above,
    # 22% less time per UNet epoch of the fashion demo on 2 cores, the same losses to 4 digits (docs/benchmarks.md)
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=cfg.weight_decay, fused=True)
    unet_opt = torch.optim.AdamW([p for p in unet_step.parameters() if p.requires_grad], lr=cfg.lr,
                                 weight_decay=cfg.weight_decay, fused=True)
    sampler: DistributedSampler = DistributedSampler(train_set, num_replicas=acc.num_processes,
                                                     rank=acc.process_index, shuffle=True, seed=seed)
    loader = DataLoader(_WithIndex(train_set), batch_size=cfg.batch_size, sampler=sampler, drop_last=False)
    # Cosine decay over the UNet's steps, after a short warm-up (not passed to `prepare`: one step per process).
    unet_steps = len(loader) * cfg.epochs
    warm = max(1, unet_steps // 20)
    def factor(s: int) -> float:
        decay = 0.5 * (1 + math.cos(math.pi * min(s, unet_steps) / unet_steps)) if cfg.lr_schedule == "cosine" else 1.0
        return min(1.0, (s + 1) / warm) * decay

    unet_sched = torch.optim.lr_scheduler.LambdaLR(unet_opt, factor)
    total = cfg.vae_epochs + cfg.epochs
    epochs = Epochs(acc, ckpt_path, total, what="builtin-ldm", progress=progress, on_epoch_end=on_epoch_end)
    scaling: float | None = None  # set when the UNet phase starts
    if resume:
        def load(state: dict[str, Any]) -> None:
            for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
                module.load_state_dict(state["modules"][name])
            vae_opt.load_state_dict(state["vae_optimizer"])
            unet_opt.load_state_dict(state["unet_optimizer"])
            unet_sched.load_state_dict(state["unet_scheduler"])

        epochs.resume(load)
    vae_model, unet_model, vae_opt, unet_opt = acc.prepare(vae_step, unet_step, vae_opt, unet_opt)
    noise_sched: Any = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000, clip_sample=False)
    latent_mean = latent_std = None
    for epoch in epochs:
        sampler.set_epoch(epoch)
        phase = "vae" if epoch < cfg.vae_epochs else "unet"
        if phase == "unet" and latent_mean is None:
            vae.eval()
            latent_mean, latent_std = _encode_all(vae, train_set, cfg.batch_size, acc.device)
            # LDM's rule: latents scaled to unit variance. The autoencoder is frozen from here on, so a resumed run
            # computes the same factor (from every training image, on every rank).
            scaling = float(1.0 / latent_mean.std())
            vae.register_to_config(scaling_factor=scaling)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + acc.process_index)
        model = vae_model if phase == "vae" else unet_model
        model.train()
        for batch_idx, (x, y, idx) in enumerate(epochs.batches(loader, f"{phase} epoch {epoch + 1}/{total}")):
            if phase == "vae":
                loss, terms = vae_model(x.to(acc.device))
                opt = vae_opt
            else:
                assert latent_mean is not None and latent_std is not None and scaling is not None
                z = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)) * scaling
                noise = torch.randn(z.shape, generator=gen)
                t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z),), generator=gen)
                noisy = noise_sched.add_noise(z, noise, t)
                drop = torch.rand(len(y), generator=gen) < cfg.cond_dropout
                cls = torch.where(drop, len(class_names), y)  # the empty prompt for a share of the images
                weight = (None if cfg.snr_gamma is None
                          else snr_weights(noise_sched.alphas_cumprod, t, cfg.snr_gamma).to(acc.device))
                loss, terms = unet_model(noisy.to(acc.device), t.to(acc.device), cls.to(acc.device),
                                         noise.to(acc.device), weight)
                opt = unet_opt
            if not torch.isfinite(loss.detach()):
                raise RuntimeError(f"builtin-ldm: non-finite {phase} loss at epoch {epoch + 1}, step {batch_idx + 1}; "
                                   f"lower ldm.lr / ldm.vae_lr. Last good checkpoint: '{ckpt_path}'")
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if phase == "unet":
                unet_sched.step()
            epochs.add(terms)
        metrics = epochs.metrics(epoch, (vae_opt if phase == "vae" else unet_opt).param_groups[0]["lr"])
        epochs.end(metrics, lambda: {
            "modules": {"unet": acc.unwrap_model(unet_model).unet.state_dict(),
                        "vae": acc.unwrap_model(vae_model).vae.state_dict(),
                        "text_encoder": acc.unwrap_model(unet_model).text.state_dict()},
            "vae_optimizer": vae_opt.state_dict(), "unet_optimizer": unet_opt.state_dict(),
            "unet_scheduler": unet_sched.state_dict(), "scaling_factor": scaling,
            "meta": {**(meta or {}), "kind": NAME, "image_size": image_size, "seed": seed,
                     "class_names": list(class_names), "prompt": prompt}}, label=f"{phase} epoch")
    return epochs.result()
