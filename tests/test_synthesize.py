import json

import pytest
import torch

import oal.synthesize as S
from oal.config import DiffusionConfig

CFG = DiffusionConfig(steps=3, num_outliers=10, shard_size=4, batch_size=3)
NAMES = ["zero", "one", "two"]


def _outliers():
    return torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))


def test_plan():
    plan = S.plan_shards(10, 4, seed=2)
    assert [(s.start, s.count) for s in plan] == [(0, 4), (4, 4), (8, 2)]
    assert len({s.seed for s in plan}) == 3


def test_shards_manifest_and_resume(tmp_path):
    m = S.synthesize(CFG, NAMES, _outliers(), tmp_path, seed=0, fingerprint="fp", progress=False)
    assert m["count"] == 10 and m["vector_shape"] == [10, 8] and m["latent_shape"] == [4, 8, 8]
    assert m["untrained_model"] and m["fingerprint"] == "fp" and len(m["shards"]) == 3
    vec = torch.load(tmp_path / S.VECTORS, weights_only=False)["outliers"]
    shard = torch.load(tmp_path / "shard_00000.pt", weights_only=False)
    assert torch.equal(shard["class_ids"], torch.tensor([0, 1, 2, 0]))  # classes in turn
    assert torch.allclose(vec[:4], shard["latents"].float().mean(1).mean(1), atol=1e-2)  # from the kept latents
    assert m["shards"] == ["shard_00000.pt", "shard_00001.pt", "shard_00002.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*m["shards"], S.VECTORS, S.MANIFEST])  # no .tmp
    first = {name: torch.load(tmp_path / name, weights_only=False) for name in m["shards"]}
    # re-run: complete shards are skipped, a corrupt one and a missing one are redone
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard_*.pt")}
    (tmp_path / "shard_00001.pt").write_bytes(b"half written")
    (tmp_path / "shard_00002.pt").unlink()
    crash = tmp_path / ".shard_00002.pt.abc.tmp"  # what a crash in the middle of save_torch leaves
    crash.write_bytes(b"left by a crash")
    m2 = S.synthesize(CFG, NAMES, _outliers(), tmp_path, seed=0, fingerprint="fp", progress=False)
    assert (tmp_path / "shard_00000.pt").stat().st_mtime_ns == mtimes["shard_00000.pt"]
    assert (tmp_path / "shard_00001.pt").stat().st_mtime_ns != mtimes["shard_00001.pt"]
    for name, d in first.items():  # the redone shards are whole, and the same as the first run's
        again = torch.load(tmp_path / name, weights_only=False)
        assert set(again) == set(d) and all(torch.equal(again[k], d[k]) for k in ("latents", "vectors", "class_ids"))
    assert torch.equal(torch.load(tmp_path / S.VECTORS, weights_only=False)["outliers"], vec)
    assert m2["count"] == 10 and m2["shards"] == m["shards"]
    assert json.loads((tmp_path / S.MANIFEST).read_text()) == m2
    # the crash's temporary file was never taken for the shard (shard 2 above is whole), and the re-run leaves no
    # temporary file of its own
    assert {p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")} <= {crash.name}


def test_shard_content_does_not_depend_on_who_computes_it(tmp_path):
    plan = S.plan_shards(CFG.num_outliers, CFG.shard_size, seed=0)
    synth = S.LatentSynthesizer(CFG, NAMES, _outliers())
    alone = synth.run(plan[2])
    S.synthesize(CFG, NAMES, _outliers(), tmp_path, seed=0, progress=False)
    full = torch.load(tmp_path / plan[2].filename, weights_only=False)
    assert torch.equal(alone["vectors"], full["vectors"])


def test_nonfinite_latents_dropped_then_fail(tmp_path, monkeypatch):
    real = S.sample_latents

    def some_nan(model, cond, uncond, cfg, gen):
        x = real(model, cond, uncond, cfg, gen)
        x[0] = float("nan")  # first of every batch
        return x

    monkeypatch.setattr(S, "sample_latents", some_nan)
    cfg = DiffusionConfig(steps=2, num_outliers=8, shard_size=8, batch_size=4, max_nonfinite_fraction=0.3)
    m = S.synthesize(cfg, NAMES, _outliers(), tmp_path / "a", seed=0, progress=False)
    assert m["dropped_nonfinite"] == 2 and m["count"] == 6
    cfg.max_nonfinite_fraction = 0.1
    with pytest.raises(RuntimeError, match="2 of 8 latents were NaN"):
        S.synthesize(cfg, NAMES, _outliers(), tmp_path / "b", seed=0, progress=False)
    assert not (tmp_path / "b" / S.MANIFEST).exists()


def test_wrong_width_is_named():
    with pytest.raises(ValueError, match="16-d.*32-d"):
        S.LatentSynthesizer(CFG, NAMES, torch.randn(3, 5, 16))
    with pytest.raises(ValueError, match=r"\[C=3, M, E\]"):
        S.LatentSynthesizer(CFG, NAMES, torch.randn(2, 5, 32))
