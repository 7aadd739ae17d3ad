"""The deployable detector: preprocessing equal to the benchmark's, the threshold at the ID acceptance rate asked
for, the stage's record of its choice and figures, and answers that survive saving and loading."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from oal import registry, stages
from oal.config import TrainConfig, load_config
from oal.data import build_benchmark, grey_images
from oal.detector import Detector, DetectorSpec, ImageError, threshold_at
from oal.evaluate import KNNScore, energy_score
from oal.models import build_student
from oal.train import Loop, fit
from tests.conftest import QUICK


def _spec(**kw):
    base = dict(arch="resnet_tiny", class_names=["a", "b", "c"], image_size=16, grey=True, mean=[0.5] * 3,
                std=[0.5] * 3, score="ebo", threshold=0.0, id_tpr=0.95)
    return DetectorSpec(**{**base, **kw})


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def net():
    torch.manual_seed(0)
    return build_student("resnet_tiny", 3).eval()


def test_threshold_accepts_the_share_of_id_asked_for():
    conf = np.random.default_rng(0).normal(size=1000)
    for tpr in (0.5, 0.9, 0.95, 0.99):
        t = threshold_at(conf, tpr)
        assert np.mean(-conf <= t) == pytest.approx(tpr, abs=1e-3)


def test_grey_preprocessing_equals_the_benchmarks(net):
    det = Detector(_spec(), net)
    g = np.random.default_rng(1)
    raw = g.integers(0, 256, size=(5, 8, 8), dtype=np.uint8)
    expected = grey_images(raw, 16)  # what oal.data makes of the same images for training and evaluation
    assert torch.allclose(det.preprocess(list(raw)), expected, atol=1e-6)
    assert torch.allclose(det.preprocess([_png(a) for a in raw]), expected, atol=1e-6)  # encoded: the same
    # a colour image is turned grey (BT.601) for a network trained on grey images; alpha is dropped
    rgb = np.stack([raw[0], raw[1], raw[2]], -1)
    luma = (0.299 * raw[0] + 0.587 * raw[1] + 0.114 * raw[2]) / 255
    got = det.preprocess([rgb, np.concatenate([rgb, np.full((8, 8, 1), 7, np.uint8)], -1)])
    assert torch.allclose(got[0], grey_images(luma[None].astype(np.float32), 16)[0], atol=1e-5)
    assert torch.equal(got[0], got[1])
    # a colour network gets grey images replicated, normalised by its own statistics
    colour = Detector(_spec(grey=False, mean=[0.1, 0.2, 0.3], std=[0.2, 0.2, 0.2], image_size=8), net)
    x = colour.preprocess([raw[0]])[0]
    assert torch.allclose(x[2], (torch.from_numpy(raw[0] / 255).float() - 0.3) / 0.2, atol=1e-6)


def test_unreadable_inputs_are_rows_with_their_error(net):
    det = Detector(_spec(), net)
    good = np.zeros((8, 8), np.uint8)
    out = det.predict([good, b"not an image", np.zeros((2, 2, 2), np.uint8), np.full((8, 8), 3.0), good])
    assert out["error"][0] is None and out["error"][4] is None
    assert "not a PNG or JPEG" in out["error"][1] and "image 1" in out["error"][1]
    assert "shape (2, 2, 2)" in out["error"][2] and "values in [3.0, 3.0]" in out["error"][3]
    assert out["label"][1:4] == [None] * 3 and out["label"][0] == out["label"][4]
    with pytest.raises(ImageError, match="image 0"):
        det.preprocess([np.zeros((3,), np.uint8)])


def test_answers_follow_the_chosen_score_and_threshold(net, tmp_path):
    g = torch.Generator().manual_seed(3)
    bank = torch.nn.functional.normalize(torch.randn(50, net.feature_dim, generator=g), dim=-1)
    x = torch.rand(12, 8, 8, generator=g)
    for score, kw in (("ebo", {}), ("knn", {"knn_k": 5})):
        det = Detector(_spec(score=score, threshold=-1.0, **kw), net, bank if score == "knn" else None)
        out = det.predict(list(x.numpy()))
        inputs = det.preprocess(list(x.numpy()))
        with torch.no_grad():
            logits, feats = net(inputs)
        conf = energy_score(logits) if score == "ebo" else KNNScore(bank, 5)(feats)
        assert out["ood_score"] == pytest.approx((-conf).tolist(), abs=1e-5)
        assert out["is_ood"] == [s > -1.0 for s in out["ood_score"]]
        assert out["label"] == logits.argmax(-1).tolist()
        assert out["class_name"] == [["a", "b", "c"][i] for i in out["label"]]
        assert out["confidence"] == pytest.approx(torch.softmax(logits, -1).amax(-1).tolist(), abs=1e-6)
        det.save(tmp_path / score)
        again = Detector.load(tmp_path / score)  # weights_only=True load: tensors and JSON only
        assert again.predict(list(x.numpy())) == out


def test_detector_stage_records_its_choice_and_the_flagged_shares(tmp_path):
    cfg = load_config("digits", [*QUICK, f"output_dir={tmp_path}", "detector.id_tpr=0.9"])
    bench = build_benchmark(cfg.data)
    torch.manual_seed(0)
    net = build_student(cfg.model.student, bench.num_classes)
    ckpt = fit(net, bench.train, TrainConfig(epochs=2, lr=0.05), tmp_path / "student",
               Loop(batch_size=64, seed=0, device="cpu", progress=False),
               meta={"arch": cfg.model.student, "num_classes": bench.num_classes}).checkpoint
    ev, report = registry.evaluate(cfg, checkpoint=str(ckpt), bench=bench)
    res = registry.run_stage("detector", cfg, bench)
    m = json.loads((res.dir / stages.MANIFEST).read_text())
    assert m["score"] == report.chosen and m["chosen_on_validation"] is True  # digits has a validation OOD set
    assert m["knn_k"] == (report.knn_k if report.chosen == "knn" else None)
    n_val = len(bench.val)
    assert abs(m["validation"]["id_accepted"] - 0.9) <= 1.5 / n_val  # the threshold is set on ID validation
    det = Detector.load(res.dir / "model")
    assert det.spec.grey and det.spec.class_names == bench.class_names and det.spec.threshold == m["threshold"]
    # the packaged detector on the raw test images flags what the stage recorded
    raw = (bench.test.tensors[0][:, 0] * 0.5 + 0.5).clamp(0, 1).numpy()  # (N, S, S) in [0, 1]
    flagged = np.mean(det.predict(list(raw))["is_ood"])
    assert flagged == pytest.approx(m["test"]["id_flagged"], abs=2 / len(raw))
    near = (bench.near["digits678"].tensors[0][:, 0] * 0.5 + 0.5).clamp(0, 1).numpy()
    assert np.mean(det.predict(list(near))["is_ood"]) == pytest.approx(m["test"]["flagged:digits678"], abs=2 / len(near))
    assert registry.run_stage("detector", cfg, bench).skipped


def test_oal_score_answers_one_json_line_per_file(net, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    det = Detector(_spec(threshold=-2.0), net)
    det.save(tmp_path / "det")
    raw = np.random.default_rng(4).integers(0, 256, size=(3, 10, 10), dtype=np.uint8)
    files = []
    for i, a in enumerate(raw):
        (tmp_path / f"{i}.png").write_bytes(_png(a))
        files.append(str(tmp_path / f"{i}.png"))
    (tmp_path / "bad.png").write_text("not an image")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run([sys.executable, "-m", "oal", "score", "--model", str(tmp_path / "det"), *files,
                        str(tmp_path / "bad.png"), str(tmp_path / "missing.png")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 1, r.stderr  # some files could not be scored
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["file"] for row in rows] == [*files, str(tmp_path / "bad.png"), str(tmp_path / "missing.png")]
    expected = det.predict([_png(a) for a in raw])
    assert [row["is_ood"] for row in rows[:3]] == expected["is_ood"]
    assert [row["ood_score"] for row in rows[:3]] == pytest.approx(expected["ood_score"], abs=1e-6)
    assert "not a PNG or JPEG" in rows[3]["error"] and "No such file" in rows[4]["error"]
    r = subprocess.run([sys.executable, "-m", "oal", "score", "--model", str(tmp_path / "nowhere"), files[0]],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "cannot load the detector" in r.stderr and "Traceback" not in r.stderr
