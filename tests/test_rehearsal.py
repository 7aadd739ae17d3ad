"""Scale rehearsal: the paper presets end to end on data the test writes in the real on-disk formats (an OpenOOD
v1.5 tree of lists and PNGs, a Stable-Diffusion-layout diffusers folder with a CLIP BPE tokenizer, a timm ViT
weights file). Only sizes and epochs are shrunk by overrides (`tests.realdata.rehearsal`); every code path is the
preset's own. cifar10_oal (224 px) goes through `ray job submit` on the real local stack; cifar100_32 (student
32 px, teacher 224 px) runs the same stages through `oal pipeline` in one process: its sizes live in the stages
(the jobs only place them on Ray workers, whatever the sizes), and the Ray path is the 224 px run's. Between them
both benchmarks, both student sizes and both anchor scales (cifar10's encoder mean, cifar100's token embedding)
run; the 224 px run on Ray takes CIFAR-10's 10 classes, so 20 training images at 224 px instead of 200."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.realdata import CLASSES, REHEARSAL_EVAL_IMAGES, rehearsal
from tests.stack_fixtures import wait_job

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, list[str]]]:
    """The rehearsal data of a preset (its benchmark's tree, a teacher file and a diffusers folder), written on
    first use, and its overrides."""
    written: dict[str, tuple[Path, list[str]]] = {}

    def of(preset: str) -> tuple[Path, list[str]]:
        if preset not in written:
            root = tmp_path_factory.mktemp("rehearsal") / "data"
            written[preset] = root, rehearsal(root, preset)
        return written[preset]

    return of


# The OOD sets of the OpenOOD v1.5 leaderboard, per ID benchmark (near: the other CIFAR and TinyImageNet)
LEADERBOARD_SETS = {"cifar10": {"cifar100", "tin", "mnist", "svhn", "texture", "places365"},
                    "cifar100": {"cifar10", "tin", "mnist", "svhn", "texture", "places365"}}


def _check_run(run: Path, data: Path, logs: str, student_size: int, benchmark: str) -> None:
    """What both presets' runs must show; `logs`: everything the run printed (its table, its log lines)."""
    # the results table: the base stage is the CE baseline row, the OAL student the other, both best-epoch
    table = (run / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| CE", "| OAL"))]
    # each network first under the score its validation data chose, then the others; both at their best epoch
    assert rows[0].startswith("| CE (base stage) |") and rows[1].startswith("| OAL (student) |")
    assert all("*chosen*" in r and "| best (epoch 1) |" in r for r in rows[:2])
    assert table in logs

    # the ID test set is exactly OpenOOD's test list, and the OOD sets are the leaderboard's
    test_list = data / "openood" / "benchmark_imglist" / benchmark / f"test_{benchmark}.txt"
    n_test = len(test_list.read_text().splitlines())
    for d in ("eval", "eval_base"):
        res = json.loads((run / d / "results.json").read_text())
        per_set = res["results"]["ebo"]["per_set"]
        assert set(per_set) == LEADERBOARD_SETS[benchmark]
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
    assert len(anchors["outlier_norms"]) == len(CLASSES[benchmark])  # one per class name


@pytest.mark.ray
@pytest.mark.stack
@pytest.mark.slow
def test_paper_preset_through_ray_job_submit(stack, data, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    preset = "cifar10_oal"
    root, overrides = data(preset)
    out = tmp_path / "runs"
    entry = " ".join(["python -m jobs.pipeline --config", preset, "--no-progress", *overrides, f"output_dir={out}",
                      "cluster.use_gpu=false"])
    client = JobSubmissionClient(stack.env["RAY_API_SERVER_ADDRESS"])
    job = client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(REPO),
                                                           "excludes": [".venv", ".git", "runs", ".stack", "*.pt"]})
    status = wait_job(client, job, timeout=600)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    _check_run(out / preset, root, logs, student_size=224, benchmark="cifar10")


@pytest.mark.slow
def test_paper_preset_at_32_px_in_one_process(data, tmp_path):
    preset = "cifar100_32"
    root, overrides = data(preset)
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "oal", "pipeline", "--config", preset, "--no-progress", *overrides,
                        f"output_dir={out}", "cluster.use_gpu=false"],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    _check_run(out / preset, root, r.stdout + r.stderr, student_size=32, benchmark="cifar100")
