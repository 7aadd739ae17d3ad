import pytest
import torch

from oal.config import DiffusionConfig
from oal.diffusion import (
    AnchorProjection,
    WordTokenizer,
    class_anchors,
    class_token_position,
    decode,
    encode_prompts,
    encode_with_outliers,
    fit_projection,
    load_model,
    reduce_latents,
    sample_latents,
    tokenize,
)

CFG = DiffusionConfig(steps=4, guidance_scale=7.5)


@pytest.fixture(scope="module")
def model():
    return load_model(CFG, "cpu", seed=0)


def test_builtin_model_is_labelled_untrained(model):
    assert model.untrained and "untrained" in model.model_id
    assert model.cond_dim == 32 and model.latent_size(None) == 8 and model.vae_factor == 2


def test_tokenizer_is_deterministic():
    tok = WordTokenizer()
    a = tok(["A high-quality image of the zero"])["input_ids"]
    assert a.shape == (1, 16) and a[0, 0] == 0 and (a[0] == 1).sum() == 1
    assert torch.equal(a, WordTokenizer()(["a HIGH-quality image of the zero"])["input_ids"])


def test_class_token_position_and_anchors(model):
    pos = class_token_position(model, CFG.prompt, "zero")
    ids = model.tokenizer([CFG.prompt.format("zero")])["input_ids"][0]
    assert ids[pos] == model.tokenizer.word_ids("zero")[0]
    # a two-word name: the outlier goes to its first word, as in the reference
    pos2 = class_token_position(model, CFG.prompt, "sea lion")
    assert pos2 == pos
    ids2 = model.tokenizer([CFG.prompt.format("sea lion")])["input_ids"][0]
    assert ids2[pos2] == model.tokenizer.word_ids("sea")[0]
    anchors = class_anchors(model, ["zero", "one", "sea lion"], CFG.prompt)
    assert anchors.shape == (3, 32)
    bare = encode_prompts(model, ["one"])  # (1, L, E): the bare class name, padded
    assert torch.allclose(anchors[1], bare[0].mean(0))  # the mean over every position
    assert not torch.allclose(anchors[1], encode_prompts(model, [CFG.prompt.format("one")])[0].mean(0))


def test_no_token_class_name_is_one_clear_error(model):
    with pytest.raises(ValueError, match="splits class name '   ' into no tokens"):
        class_anchors(model, ["zero", "   "])
    with pytest.raises(ValueError, match="into no tokens"):
        class_token_position(model, CFG.prompt, "")


def test_outlier_enters_the_input_embedding_and_reaches_end_of_text(model):
    prompts = [CFG.prompt.format("zero")] * 2
    ids = tokenize(model, prompts)  # (2, L)
    plain = encode_prompts(model, prompts)  # (2, L, E)
    pos = class_token_position(model, CFG.prompt, "zero")
    eot = int((ids[0] == model.tokenizer.eos_token_id).nonzero()[0])
    assert eot > pos
    weights = model.text_encoder.get_input_embeddings().weight.clone()
    new = encode_with_outliers(model, ids, torch.tensor([pos, pos]), torch.randn(2, 32))
    changed = (new - plain).abs().amax(-1) > 1e-5  # (2, L)
    # CLIP's text transformer is causal: positions before the class token cannot see the outlier, every
    # later one does, the end-of-text token and the padding included
    assert not changed[:, :pos].any()
    assert changed[:, pos:].all() and changed[:, eot].all()
    assert not torch.allclose(new[0], new[1])  # each row gets its own outlier
    # the encoder is left as it was: no weight changed, no hook left behind
    assert torch.equal(model.text_encoder.get_input_embeddings().weight, weights)
    assert torch.allclose(encode_prompts(model, prompts), plain)
    # writing back the token's own embedding reproduces the plain encoding
    own = weights[ids[:, pos]]  # (2, E)
    assert torch.allclose(encode_with_outliers(model, ids, torch.tensor([pos, pos]), own), plain, atol=1e-6)


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "dpm"])
def test_sampler_is_seeded_and_conditioned(model, scheduler):
    cfg = DiffusionConfig(steps=4, scheduler=scheduler)
    cond = encode_prompts(model, [CFG.prompt.format("zero")] * 2)
    uncond = encode_prompts(model, [""]).expand(2, -1, -1)
    a = sample_latents(model, cond, uncond, cfg, torch.Generator().manual_seed(1))
    b = sample_latents(model, cond, uncond, cfg, torch.Generator().manual_seed(1))
    assert a.shape == (2, 4, 8, 8) and torch.isfinite(a).all() and torch.equal(a, b)
    pos = class_token_position(model, CFG.prompt, "zero")
    ids = tokenize(model, [CFG.prompt.format("zero")] * 2)
    other = encode_with_outliers(model, ids, torch.tensor([pos, pos]), 10 * torch.randn(2, 32))
    c = sample_latents(model, other, uncond, cfg, torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)  # the replaced embedding reaches the UNet


def test_reductions_by_hand():
    x = torch.arange(2 * 4 * 2 * 3, dtype=torch.float32).view(2, 4, 2, 3)
    v = reduce_latents(x)
    assert v.shape == (2, 3)
    assert torch.allclose(v[0], x[0].mean(0).mean(0))
    assert reduce_latents(x, "channel_mean").shape == (2, 6)
    assert reduce_latents(x, "flatten").shape == (2, 24)


def test_decode_is_pixels(model):
    img = decode(model, torch.randn(3, 4, 8, 8))
    assert img.shape == (3, 3, 16, 16) and img.min() >= 0 and img.max() <= 1


def test_projection_aligns_classes_with_anchors():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 1, 16, generator=g)
    emb = centres + 0.3 * torch.randn(4, 20, 16, generator=g)  # (C, N, D)
    anchors = torch.randn(4, 8, generator=g)
    proj, acc = fit_projection(emb, anchors, steps=150, seed=0)
    assert proj.in_dim == 16 and proj.out_dim == 8 and acc > 0.95
    same, _ = fit_projection(torch.randn(2, 5, 8), torch.randn(2, 8), steps=10, seed=0)
    x = torch.randn(3, 8)
    assert same.linear is None and torch.equal(same(x), x)
    with pytest.raises(ValueError, match="class list does not match"):
        fit_projection(emb, anchors[:3], steps=1, seed=0)
    assert isinstance(proj, AnchorProjection)


def test_diffusers_folder_missing_component(tmp_path):
    for c in ("unet", "vae", "text_encoder", "scheduler"):
        (tmp_path / c).mkdir()
    with pytest.raises(FileNotFoundError, match="lacks component folder.*tokenizer"):
        load_model(DiffusionConfig(model=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="not a diffusers folder"):
        load_model(DiffusionConfig(model=str(tmp_path / "nowhere")))


def test_attention_is_sdpa_and_samples_as_classic_attention_does():
    from dataclasses import replace

    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    m = load_model(CFG, "cpu", seed=0)
    procs = [*m.unet.attn_processors.values(), *m.vae.attn_processors.values()]
    assert procs and all(isinstance(p, AttnProcessor2_0) for p in procs)
    cond = encode_prompts(m, [CFG.prompt.format("zero")] * 2)
    uncond = encode_prompts(m, [""]).expand(2, -1, -1)
    sdpa = sample_latents(m, cond, uncond, CFG, torch.Generator().manual_seed(3))
    m.unet.set_attn_processor(AttnProcessor())  # softmax over a materialised score matrix
    classic = sample_latents(m, cond, uncond, CFG, torch.Generator().manual_seed(3))
    assert torch.allclose(sdpa, classic, atol=1e-4) and not torch.equal(sdpa, torch.zeros_like(sdpa))
    # diffusion.compile wraps the UNet for torch.compile (compiled on its first call, on a GPU in bench.gpu_speed);
    # the wrapper still answers the config questions the sampler asks
    compiled = load_model(replace(CFG, compile="default"), "cpu", seed=0)
    assert isinstance(compiled.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.latent_size(None) == 8 and compiled.latent_channels == 4
