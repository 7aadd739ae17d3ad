"""Pretrained built-in diffusion models: the shipped one matches its card and the fashion preset; a folder is used
instead of training only when its card fits the run, and any mismatch trains with one log line saying why."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from oal import ldm, pretrained, registry
from oal.config import load_config, to_yaml
from oal.data import build_benchmark
from tests.conftest import QUICK

LDM = ["diffusion.model=builtin-ldm", "ldm.eval_samples=2", "ldm.grid_per_class=1", "diffusion.steps=2"]


def _cfg(tmp_path: Path, *extra: str):
    return load_config("digits", [*QUICK, f"output_dir={tmp_path / 'runs'}", *LDM, *extra])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A pretrained folder for the digits preset, exported from a diffusion stage's checkpoint (seeded weights)."""
    tmp = tmp_path_factory.mktemp("pretrained")
    cfg = _cfg(tmp)
    stage = tmp / "stage"
    stage.mkdir()
    unet, vae, text, _, _ = ldm.build(cfg.data.image_size, 0)
    names = build_benchmark(cfg.data).class_names
    torch.save({"modules": {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text.state_dict()},
                "epoch": 3, "history": [{"epoch_seconds": 1.5}] * 3, "scaling_factor": 0.9,
                "meta": {"kind": ldm.NAME, "image_size": cfg.data.image_size, "seed": 0, "class_names": names,
                         "prompt": cfg.diffusion.prompt}}, stage / "checkpoint.pt")
    (stage / "config.yaml").write_text(to_yaml(cfg))
    (stage / "quality.json").write_text(json.dumps({"accuracy": 0.5, "samples_per_class": 2, "steps": 2}))
    out = tmp / "digits-ldm"
    pretrained.main(["export", str(stage), str(out), "--command", "oal diffusion --config digits"])
    return out


def test_export_writes_fp16_weights_and_a_card_that_names_them(folder):
    from safetensors.torch import load_file

    card = pretrained.read_card(folder / "README.md")
    weights = load_file(str(folder / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert {k.split(".")[0] for k in weights} == {"unet", "vae", "text_encoder"}
    assert card["sha256"] == pretrained.sha256(folder / "model.safetensors")
    assert card["bytes"] == (folder / "model.safetensors").stat().st_size
    assert card["training"]["epochs_done"] == 3 and card["training"]["seconds"] == 4.5
    assert card["measured"]["class_conditional_accuracy"] == 0.5 and card["command"] == "oal diffusion --config digits"
    assert "pretrained" not in card["training"]  # the recipe, not the key that points at this folder


def test_check_accepts_a_fitting_folder_and_names_each_mismatch(folder, tmp_path, caplog):
    cfg = _cfg(tmp_path, f"ldm.pretrained={folder}")
    names = build_benchmark(cfg.data).class_names
    assert pretrained.check(cfg, names) == (folder / "model.safetensors", "")
    assert pretrained.check(_cfg(tmp_path), names) == (None, "")  # not set: nothing to say
    cases = {
        "data.split_seed=1": "its card's split_fingerprint is",
        "data.train_per_class=50": "its card's split_fingerprint is",
        "diffusion.prompt=a photo of {}": "its card's prompt is 'A high-quality image of the {}', this run's is "
                                          "'a photo of {}'",
    }
    for override, why in cases.items():
        weights, said = pretrained.check(_cfg(tmp_path, f"ldm.pretrained={folder}", override), names)
        assert weights is None and said.startswith(why), (override, said)
    weights, said = pretrained.check(cfg, ["a", *names[1:]])
    assert weights is None and said.startswith("its card's class_names is")

    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    blob = bytearray((tampered / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (tampered / "model.safetensors").write_bytes(bytes(blob))
    caplog.set_level(logging.WARNING, logger="oal.pretrained")
    assert pretrained.usable(_cfg(tmp_path, f"ldm.pretrained={tampered}")) is None
    [line] = [r.getMessage() for r in caplog.records]
    assert f"ldm.pretrained={tampered} is not used" in line and "has sha256" in line and "training the model" in line
    (tampered / "README.md").write_text("no front matter\n")
    assert "has no YAML front matter" in pretrained.check(_cfg(tmp_path, f"ldm.pretrained={tampered}"))[1]


def test_shipped_model_fits_the_fashion_preset():
    """The card against the file and the preset: what `make demo` relies on to skip training."""
    from safetensors.torch import load_file

    from oal.data import fashion

    cfg = load_config("fashion")
    assert cfg.ldm.pretrained == "fashion-ldm"
    d = pretrained.folder(cfg.ldm.pretrained)
    assert d == pretrained.SHIPPED / "fashion-ldm"
    card = pretrained.read_card(d / "README.md")
    assert card["sha256"] == pretrained.sha256(d / "model.safetensors")
    assert card["bytes"] == os.path.getsize(d / "model.safetensors") <= 10 * 2**20
    assert card["split_fingerprint"] == pretrained.split_fp(cfg.data)
    assert card["class_names"] == [fashion.NAMES[c] for c in fashion.ID_CLASSES]
    assert card["image_size"] == cfg.data.image_size and card["prompt"] == cfg.diffusion.prompt
    # no accuracy on the card that was not measured
    assert 0.5 < card["measured"]["class_conditional_accuracy"] <= 1
    assert pretrained.check(cfg, card["class_names"]) == (d / "model.safetensors", "")
    unet, vae, text, _, _ = ldm.build(card["image_size"], card["seed"])
    flat = load_file(str(d / "model.safetensors"))
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        part = {k.split(".", 1)[1]: v.float() for k, v in flat.items() if k.startswith(f"{name}.")}
        module.load_state_dict(part, strict=True)  # every weight there, nothing else
    # the card's YAML is what the README shows
    assert yaml.safe_load((d / "README.md").read_text().split("---\n")[1]) == card


def _teacher(cfg) -> None:
    from dataclasses import replace

    registry.run_stage("teacher", replace(cfg, teacher=replace(cfg.teacher, epochs=1)), progress=False)


@pytest.mark.slow
def test_diffusion_stage_uses_a_fitting_model_and_trains_on_a_mismatch(folder, tmp_path, caplog):
    cfg = _cfg(tmp_path, f"ldm.pretrained={folder}", "ldm.vae_epochs=1", "ldm.epochs=1")
    _teacher(cfg)
    res = registry.run_stage("diffusion", cfg, progress=False)
    manifest = json.loads((res.dir / "stage.json").read_text())
    assert manifest["pretrained"]["sha256"] == pretrained.read_card(folder / "README.md")["sha256"]
    assert 0 <= manifest["metrics"]["class_conditional_accuracy"] <= 1 and (res.dir / "quality.json").exists()
    state = torch.load(res.dir / "checkpoint.pt", weights_only=True)
    assert state["history"] == [] and state["meta"]["fingerprint"] == res.fingerprint
    # the checkpoint holds the shipped weights (fp16 -> fp32), read by the stages that sample
    from safetensors.torch import load_file

    flat = load_file(str(folder / "model.safetensors"))
    assert torch.equal(state["modules"]["unet"]["conv_in.weight"], flat["unet.conv_in.weight"].float())
    ldm.load_trained(res.dir / "checkpoint.pt")
    assert registry.run_stage("diffusion", cfg, progress=False).skipped

    # the same run with its copy of the weights changed: another fingerprint, a warning, and the model is trained
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    blob = bytearray((tampered / "model.safetensors").read_bytes())
    blob[100] ^= 1
    (tampered / "model.safetensors").write_bytes(bytes(blob))
    caplog.set_level(logging.WARNING, logger="oal.pretrained")
    trained = registry.run_stage("diffusion", _cfg(tmp_path, f"ldm.pretrained={tampered}", "ldm.vae_epochs=1", "ldm.epochs=1"),
                                   progress=False)
    assert not trained.skipped and trained.fingerprint != res.fingerprint
    assert any("is not used" in r.getMessage() for r in caplog.records)
    state = torch.load(trained.dir / "checkpoint.pt", weights_only=True)
    assert [h["epoch"] for h in state["history"]] == [1, 2] and "pretrained" not in state["meta"]


def test_the_diffusion_fingerprint_follows_the_pretrained_model(tmp_path, folder):
    """ldm.pretrained and its card's sha256 are inputs of the diffusion stage: none, this folder and the shipped model
    are three fingerprints; the card read is the one of the folder named."""
    fps = {registry.fingerprint("diffusion", _cfg(tmp_path, *extra))
           for extra in ([], [f"ldm.pretrained={folder}"], ["ldm.pretrained=fashion-ldm"])}
    assert len(fps) == 3
    assert registry.named("diffusion").also(_cfg(tmp_path, f"ldm.pretrained={folder}")) == [
        pretrained.read_card(folder / "README.md")["sha256"]]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_uses_the_pretrained_model_on_a_worker(stack, folder, tmp_path):
    """`jobs.train` (the pipeline's diffusion stage): a fitting model is measured in a Ray worker, no training group."""
    import ray

    from jobs import train as jt

    cfg = _cfg(tmp_path, f"ldm.pretrained={folder}")
    _teacher(cfg)
    if not ray.is_initialized():
        ray.init(address="auto", logging_level="WARNING")
    res = jt.run_stage(cfg, "diffusion", progress=False)
    manifest = json.loads((res.dir / "stage.json").read_text())
    assert manifest["pretrained"]["weights"] == str(folder / "model.safetensors")
    assert manifest["written_by"]["pid"] != os.getpid()
    assert not Path(cfg.ray_storage).exists()  # no Ray Train run was started
