"""The built-in latent diffusion model trained by the diffusion stage: training, resume, loading, its measure."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from oal import ldm
from oal.config import DiffusionConfig, LDMConfig
from oal.diffusion import BUILTIN_LDM, class_conditional_accuracy, load_model, sample_latents

NAMES = ["dark", "bright"]
PROMPT = "A high-quality image of the {}"


def _images(n: int = 24, size: int = 16) -> TensorDataset:
    """Two classes: dark (-0.8) and bright (+0.8) squares with a little noise, in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = (y.float() * 1.6 - 0.8)[:, None, None, None] + 0.05 * torch.randn(n, 3, size, size, generator=g)
    return TensorDataset(x.clamp(-1, 1), y)


CFG = LDMConfig(vae_epochs=1, epochs=2, batch_size=8, eval_samples=2, grid_per_class=2)


class Interrupt(Exception):
    pass


def _weights(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return {f"{m}.{k}": v for m, sd in state["modules"].items() for k, v in sd.items()}


def test_trains_both_phases_into_one_loadable_checkpoint(tmp_path):
    res = ldm.fit_ldm(_images(), NAMES, PROMPT, 16, CFG, tmp_path, seed=0, device="cpu", progress=False)
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    assert "loss/reconstruction" in res.history[0] and "loss/noise_mse" in res.history[2]
    state = torch.load(res.checkpoint, weights_only=True)
    assert state["meta"]["kind"] == ldm.NAME and state["meta"]["image_size"] == 16
    assert state["scaling_factor"] > 0
    model = load_model(DiffusionConfig(model=BUILTIN_LDM, checkpoint=str(res.checkpoint)), "cpu")
    assert model.vae.config.scaling_factor == pytest.approx(state["scaling_factor"])
    assert model.latent_size(None) == 4 and not model.untrained and "trained on the ID" in model.model_id
    cond = torch.zeros(2, model.tokenizer.model_max_length, model.cond_dim)
    lat = sample_latents(model, cond, cond, DiffusionConfig(steps=2), torch.Generator().manual_seed(0))
    assert lat.shape == (2, 4, 4, 4) and torch.isfinite(lat).all()


def test_an_autoencoder_only_checkpoint_is_not_a_model(tmp_path):
    def stop(epoch, metrics, ckpt):
        raise Interrupt

    with pytest.raises(Interrupt):
        ldm.fit_ldm(_images(), NAMES, PROMPT, 16, CFG, tmp_path, seed=0, device="cpu", progress=False,
                    on_epoch_end=stop)
    with pytest.raises(ValueError, match="not a finished builtin-ldm checkpoint"):
        ldm.load_trained(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("stop_after", [1, 3])  # inside the autoencoder phase; inside the UNet phase
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, stop_after):
    cfg = replace(CFG, vae_epochs=2)
    whole = ldm.fit_ldm(_images(), NAMES, PROMPT, 16, cfg, tmp_path / "whole", seed=0, device="cpu", progress=False)

    def stop(epoch, metrics, ckpt):
        if epoch == stop_after:
            raise Interrupt

    with pytest.raises(Interrupt):
        ldm.fit_ldm(_images(), NAMES, PROMPT, 16, cfg, tmp_path / "cut", seed=0, device="cpu", progress=False,
                    on_epoch_end=stop)
    resumed = ldm.fit_ldm(_images(), NAMES, PROMPT, 16, cfg, tmp_path / "cut", seed=0, device="cpu", progress=False)
    assert resumed.resumed_from_epoch == stop_after  # the resume path ran
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    a, b = _weights(whole.checkpoint), _weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=f"{k} differs after resume")


class _Always(nn.Module):
    """A 'classifier' that names class `c` for every image."""

    def __init__(self, c: int, n: int):
        super().__init__()
        self.c, self.n = c, n

    def forward(self, x):
        logits = torch.zeros(len(x), self.n)
        logits[:, self.c] = 1.0
        return logits, x.flatten(1)


def test_class_conditional_accuracy_counts_what_the_judge_says(tmp_path):
    res = ldm.fit_ldm(_images(), NAMES, PROMPT, 16, replace(CFG, epochs=1), tmp_path, seed=0, device="cpu",
                      progress=False)
    model = load_model(DiffusionConfig(model=BUILTIN_LDM, checkpoint=str(res.checkpoint)), "cpu")
    dcfg = DiffusionConfig(model=BUILTIN_LDM, steps=2, batch_size=2)
    quality, images = class_conditional_accuracy(model, _Always(1, 2), NAMES, dcfg, 3, seed=0, image_size=16)
    assert quality["per_class"] == {"dark": 0.0, "bright": 1.0} and quality["accuracy"] == pytest.approx(0.5)
    assert images.shape == (2, 3, 3, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1


def test_image_side_must_fit_the_autoencoder():
    with pytest.raises(ValueError, match="multiple of 4; data.image_size is 30"):
        ldm.build(30, seed=0)


def test_lr_schedule_cosine_decays_constant_holds(tmp_path):
    # 24 images, batch 8, 2 UNet epochs: 6 steps, warm-up of 1 step; the last epoch's lr is read after its steps
    cos = ldm.fit_ldm(_images(), NAMES, PROMPT, 16, replace(CFG, lr_schedule="cosine"), tmp_path / "cos", seed=0,
                      device="cpu", progress=False)
    const = ldm.fit_ldm(_images(), NAMES, PROMPT, 16, replace(CFG, lr_schedule="constant"), tmp_path / "const",
                        seed=0, device="cpu", progress=False)
    assert cos.history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine reaches 0 at the last step
    assert const.history[-1]["lr"] == pytest.approx(CFG.lr) == const.history[-2]["lr"]


def test_diffusion_stage_without_its_judge_fails_before_training(tmp_path):
    from oal import registry, stages
    from oal.config import load_config

    cfg = load_config("digits", [f"output_dir={tmp_path}", f"diffusion.model={BUILTIN_LDM}", "ldm.epochs=1"])
    with pytest.raises(FileNotFoundError, match="judged by the fine-tuned teacher.*oal teacher"):
        registry.run_stage("diffusion", cfg, progress=False)
    assert not (stages.stage_dir(cfg, "diffusion") / "checkpoint.pt").exists()


def test_min_snr_weights_cap_the_clean_timesteps():
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    t = torch.arange(0, 1000, 7)
    snr = alphas[t] / (1 - alphas[t])
    w = ldm.snr_weights(alphas, t, gamma=5.0)
    noisy = snr <= 5.0
    assert noisy.any() and (~noisy).any()  # both regimes are in the schedule
    torch.testing.assert_close(w[noisy], torch.ones(int(noisy.sum())))  # noisy timesteps keep their full weight
    torch.testing.assert_close(w[~noisy], 5.0 / snr[~noisy])  # clean ones are scaled down to gamma / SNR
    assert float(w.min()) < 0.01 and bool((w[1:] >= w[:-1]).all())  # weight grows with the noise level


def test_min_snr_weighting_changes_what_the_unet_learns(tmp_path):
    plain = ldm.fit_ldm(_images(), NAMES, PROMPT, 16, replace(CFG, epochs=1), tmp_path / "plain", seed=0,
                        device="cpu", progress=False)
    snr = ldm.fit_ldm(_images(), NAMES, PROMPT, 16, replace(CFG, epochs=1, snr_gamma=5.0), tmp_path / "snr", seed=0,
                      device="cpu", progress=False)
    a, b = _weights(plain.checkpoint), _weights(snr.checkpoint)
    torch.testing.assert_close(a["vae.encoder.conv_in.weight"], b["vae.encoder.conv_in.weight"])  # same autoencoder
    assert not torch.allclose(a["unet.conv_in.weight"], b["unet.conv_in.weight"])  # another UNet loss
    assert all(torch.isfinite(v).all() for v in b.values())


def test_training_is_the_same_from_run_to_run_on_several_threads(tmp_path):
    """Two trainings on the digits benchmark with two CPU threads give the same weights, bit for bit. The
    conditioning rows of a batch are picked with index_select: picked by advanced indexing (`conds[cls]`), their
    gradient was summed by index_put_(accumulate=True), in an order that varied between runs (seen: every UNet and
    text-encoder tensor differed between two runs of the diffusion stage, by up to 1e-4)."""
    from oal.config import load_config
    from oal.data import build_benchmark
    from tests.conftest import QUICK

    cfg = load_config("digits", QUICK)
    bench = build_benchmark(cfg.data)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [ldm.fit_ldm(bench.train_plain, bench.class_names, PROMPT, cfg.data.image_size,
                            replace(CFG, batch_size=64, epochs=1), tmp_path / str(i), seed=0, device="cpu",
                            progress=False) for i in range(2)]
    finally:
        torch.set_num_threads(threads)
    a, b = (_weights(r.checkpoint) for r in runs)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
