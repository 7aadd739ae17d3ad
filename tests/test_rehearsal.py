"""Scale rehearsal: the paper presets end to end through `ray job submit` on the real local stack, on data the
test writes in the real on-disk formats (an OpenOOD v1.5 tree of lists and PNGs, a Stable-Diffusion-layout
diffusers folder with a CLIP BPE tokenizer, a timm ViT weights file). Only sizes and epochs are shrunk by
overrides (`tests.realdata.rehearsal`); every code path is the preset's own."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.realdata import REHEARSAL_EVAL_IMAGES, rehearsal

pytestmark = [pytest.mark.ray, pytest.mark.stack, pytest.mark.slow]
REPO = Path(__file__).parents[1]


@pytest.mark.parametrize(("preset", "student_size"), [("cifar100_oal", 224), ("cifar100_32", 32)])
def test_paper_preset_through_ray_job_submit(stack, tmp_path, preset, student_size):
    from ray.job_submission import JobStatus, JobSubmissionClient

    overrides = rehearsal(tmp_path / "data", preset)
    out = tmp_path / "runs"
    entry = " ".join(["python -m jobs.pipeline --config", preset, "--no-progress", *overrides, f"output_dir={out}",
                      "cluster.use_gpu=false"])
    client = JobSubmissionClient(stack.env["RAY_API_SERVER_ADDRESS"])
    job = client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(REPO),
                                                           "excludes": [".venv", ".git", "runs", ".stack", "*.pt"]})
    deadline = time.time() + 600
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-4000:]
    run = out / preset

    # the results table: the base stage is the CE baseline row, the OAL student the other, both best-epoch
    table = (run / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| CE", "| OAL"))]
    # each network first under the score its validation data chose, then the others; both at their best epoch
    assert rows[0].startswith("| CE (base stage) |") and rows[1].startswith("| OAL (student) |")
    assert all("*chosen*" in r and "| best (epoch 1) |" in r for r in rows[:2])
    assert table in logs

    # the ID test set is exactly OpenOOD's test list, and the OOD sets are the leaderboard's
    test_list = (tmp_path / "data" / "openood" / "benchmark_imglist" / "cifar100" / "test_cifar100.txt")
    n_test = len(test_list.read_text().splitlines())
    for d in ("eval", "eval_base"):
        res = json.loads((run / d / "results.json").read_text())
        per_set = res["results"]["ebo"]["per_set"]
        assert set(per_set) == {"cifar10", "tin", "mnist", "svhn", "texture", "places365"}
        assert {m["n_id"] for m in per_set.values()} == {n_test} == {REHEARSAL_EVAL_IMAGES}

    # the teacher was built, trained and used at 224 px whatever the student's size
    teacher = torch.load(run / "teacher" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert teacher["meta"]["input_size"] == 224
    assert teacher["modules"]["net.model.pos_embed"].shape[1] == 1 + (224 // 8) ** 2  # 28x28 patches + class token
    student = torch.load(run / "student" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert student["meta"]["arch"] == ("resnet18_224" if student_size == 224 else "resnet18_32")
    assert "student starts from the base checkpoint" in logs

    # every OAL term ran, against outliers made by the diffusers folder's own text encoder and PNDM sampler
    history = json.loads((run / "student" / "stage.json").read_text())["history"]
    assert {"loss/logit_kd", "loss/feat_kd", "loss/micl_knn", "loss/micl_lat"} <= set(history[0])
    latents = json.loads((run / "latents" / "manifest.json").read_text())
    assert latents["model_id"].endswith("/sd") and not latents["untrained_model"]
    assert (latents["scheduler"], latents["count"], latents["latent_shape"]) == ("pndm", 6, [4, 8, 8])
    anchors = json.loads((run / "anchors" / "stage.json").read_text())
    assert len(anchors["outlier_norms"]) == 100  # one per CIFAR-100 class name
