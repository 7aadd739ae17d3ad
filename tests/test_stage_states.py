"""A stage is done, resumable or to be redone, and nothing in between: a finished stage whose checkpoint was cut
short is trained again (the broken file moved aside, not lost), `force` retrains from scratch, an interrupted
stage resumes from its checkpoint, and no checkpoint load runs pickled code."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch

from oal import registry, stages, storage
from oal.config import load_config
from oal.train import CHECKPOINT
from tests.conftest import QUICK


class Stop(Exception):
    pass


@pytest.fixture
def cfg(tmp_path):
    return load_config("digits", [*QUICK, "base.epochs=2", f"output_dir={tmp_path}"])


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _base(cfg, force=False, stop_at=None):
    """Run the base stage; returns (result, the epochs this call trained)."""
    epochs = []

    def hook(epoch, metrics, ckpt):
        epochs.append(epoch)
        if epoch == stop_at:
            raise Stop

    return registry.run_stage("base", cfg, on_epoch_end=hook, progress=False, force=force), epochs


def test_manifest_records_sizes_and_digests_of_its_outputs(cfg):
    res, epochs = _base(cfg)
    assert epochs == [1, 2] and not res.skipped
    m = json.loads((res.dir / stages.MANIFEST).read_text())
    ckpt = res.dir / CHECKPOINT
    assert m["sizes"]["checkpoint"] == ckpt.stat().st_size
    assert m["sha256"]["checkpoint"] == _sha(ckpt)
    assert m["written_by"]["cpu"] == torch.backends.cpu.get_cpu_capability() != ""  # AVX2 and AVX512 round otherwise
    again, epochs = _base(cfg)
    assert again.skipped and epochs == []


def test_truncated_checkpoint_of_a_finished_stage_is_redone(cfg, caplog):
    res, _ = _base(cfg)
    ckpt = res.dir / CHECKPOINT
    whole = ckpt.read_bytes()
    ckpt.write_bytes(whole[: len(whole) // 2])  # a copy cut short, as a full disk or a killed upload leaves it
    assert not stages.is_done(res.dir, res.fingerprint)
    with caplog.at_level(logging.WARNING, logger="oal"):
        redone, epochs = _base(cfg)
    assert not redone.skipped and epochs == [1, 2]  # trained again from epoch 0
    assert "cut short" in caplog.text and "moved aside" in caplog.text
    aside = res.dir / f"{CHECKPOINT}.corrupt-0"
    assert aside.read_bytes() == whole[: len(whole) // 2]  # kept for a look, never read again
    m = json.loads((res.dir / stages.MANIFEST).read_text())
    assert m["resumed_from_epoch"] == 0 and m["sizes"]["checkpoint"] == ckpt.stat().st_size
    assert storage.load_torch(ckpt, "checkpoint")["epoch"] == 2
    assert stages.is_done(res.dir, res.fingerprint)


def test_force_retrains_a_finished_stage_from_scratch(cfg):
    res, _ = _base(cfg)
    ckpt = res.dir / CHECKPOINT
    before = _sha(ckpt)
    redone, epochs = _base(cfg, force=True)
    assert not redone.skipped and epochs == [1, 2]  # every epoch, not a "resume" past the last one
    assert _sha(ckpt) != before
    assert _sha(res.dir / f"{CHECKPOINT}.replaced-0") == before  # the old one moved aside, not lost
    assert json.loads((res.dir / stages.MANIFEST).read_text())["resumed_from_epoch"] == 0


def test_interrupted_stage_resumes_and_force_starts_over(cfg):
    with pytest.raises(Stop):
        _base(cfg, stop_at=1)
    d = stages.stage_dir(cfg, "base")
    assert (d / CHECKPOINT).exists() and not (d / stages.MANIFEST).exists()
    res, epochs = _base(cfg)
    assert epochs == [2] and json.loads((d / stages.MANIFEST).read_text())["resumed_from_epoch"] == 1

    with pytest.raises(Stop):
        _base(cfg, force=True, stop_at=1)
    res, epochs = _base(cfg, force=True)
    assert epochs == [1, 2] and not res.skipped


def test_unreadable_checkpoint_of_an_interrupted_stage_is_moved_aside(cfg, caplog):
    d = stages.stage_dir(cfg, "base")
    d.mkdir(parents=True)
    (d / CHECKPOINT).write_text("not a checkpoint")  # no manifest: the stage never finished
    with caplog.at_level(logging.WARNING, logger="oal"):
        res, epochs = _base(cfg)
    assert epochs == [1, 2] and not res.skipped
    assert (d / f"{CHECKPOINT}.corrupt-0").read_text() == "not a checkpoint"
    assert "moved aside" in caplog.text


class _RunsCode:
    """Unpickling this calls Path.touch: what a planted checkpoint could do with any other callable."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"modules": {}, "payload": _RunsCode(marker)}, tmp_path / "planted.pt")
    with pytest.raises(storage.CorruptFileError, match="planted.pt"):
        storage.load_torch(tmp_path / "planted.pt", "checkpoint")
    assert not marker.exists()


def test_training_checkpoints_load_as_plain_tensors(cfg):
    res, _ = _base(cfg)
    state = torch.load(res.dir / CHECKPOINT, map_location="cpu", weights_only=True)  # raises on any pickled object
    assert state["epoch"] == 2 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
