"""Smoke tests through the real `oal` command line (a subprocess, as a user runs it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import QUICK

OAL = [sys.executable, "-m", "oal"]  # what `python -m oal` runs; the `oal` script calls the same main


def oal(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([*OAL, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def oal_again(capsys, monkeypatch):
    """The same `oal` main (what the command runs) in this process, its exit code and output as `oal` returns them:
    for the later calls of a test whose first call ran the real command line. A new interpreter importing torch and
    the package costs each call about 5 s of CPU here."""
    from oal.cli import main

    def run(*args, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess([*OAL, *args], code, out.out, out.err)

    return run


def test_teacher_train_evaluate_then_skip(tmp_path, oal_again):
    common = ["--no-progress", *QUICK, "eval.plots=true", f"output_dir={tmp_path}"]
    r = oal("teacher", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "digits"
    teacher = json.loads((run / "teacher" / "stage.json").read_text())
    assert len(teacher["history"]) == 3 and (run / "teacher" / "checkpoint.pt").exists()
    assert (run / "teacher" / "config.yaml").read_text().count("epochs: 3") == 1

    # without k-NN outliers yet, the MICL terms are switched off on the command line
    r = oal_again("student", *common, "loss.w_micl_knn=0", "loss.w_micl_lat=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    student = json.loads((run / "student" / "stage.json").read_text())
    assert {"loss/ce", "loss/logit_kd", "loss/feat_kd", "val/id_accuracy", "val/ood_auroc"} <= set(student["history"][0])

    r = oal_again("eval", *common, "loss.w_micl_knn=0", "loss.w_micl_lat=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| ebo |" in r.stdout
    res = json.loads((run / "eval" / "results.json").read_text())
    assert set(res["results"]) == {"ebo", "msp", "mls", "knn"}
    assert 0.3 < res["id_accuracy"] <= 1.0  # 6 classes: chance is 1/6
    assert len(list((run / "eval" / "plots").glob("*.png"))) == 4 * 3
    assert not list(run.rglob("*.tmp"))

    # a second train is skipped: its inputs have not changed
    r = oal_again("student", *common, "loss.w_micl_knn=0", "loss.w_micl_lat=0", cwd=tmp_path)
    assert r.returncode == 0 and "skipped (up to date)" in r.stdout


def test_pipeline_runs_knn_stage_and_resumes(tmp_path, oal_again):
    # one teacher epoch: no check here depends on the teacher's training (the teacher test counts its epochs)
    common = ["--no-progress", *QUICK, f"output_dir={tmp_path}", "eval.baseline=true", "teacher.epochs=1"]
    r = oal("pipeline", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "digits"
    knn = json.loads((run / "knn" / "stage.json").read_text())
    assert knn["shape"] == [6, 2 * 2 * 2, 32]  # rounds * pic_nums * keep per class, conditioning width
    anchors = json.loads((run / "anchors" / "stage.json").read_text())
    assert "untrained" in anchors["model_id"]
    latents = json.loads((run / "latents" / "manifest.json").read_text())
    assert latents["count"] == 12 and latents["vector_shape"] == [12, 8] and latents["untrained_model"]
    assert (run / "latents" / "grid.png").read_bytes()[:4] == b"\x89PNG"
    student = json.loads((run / "student" / "stage.json").read_text())
    assert {"loss/micl_knn", "loss/micl_lat"} <= set(student["history"][0])
    # the CE baseline (base stage) and the OAL student, side by side
    table = (run / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| CE", "| OAL"))]
    # each network first under the score its validation data chose, then under every other score
    assert rows[0].startswith("| CE (base stage) |") and "*chosen*" in rows[0] and "| last (epoch 2) |" in rows[0]
    assert rows[1].startswith("| OAL (student) |") and "*chosen*" in rows[1] and "| last (epoch 2) |" in rows[1]
    assert len(rows) == 2 * 4
    assert table in r.stdout
    detector = json.loads((run / "detector" / "stage.json").read_text())
    assert detector["score"] == json.loads((run / "eval" / "results.json").read_text())["chosen"]
    r = oal_again("pipeline", *common, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("skipped (up to date)") == 10
    # a changed student setting (one epoch: the retrained students cost half) redoes the student, its evaluation
    # and its detector only
    r = oal_again("pipeline", *common, "student.epochs=1", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("skipped (up to date)") == 7
    # a changed sampler setting redoes synthesis and what follows, not the teacher or the k-NN outliers
    r = oal_again("pipeline", *common, "student.epochs=1", "diffusion.guidance_scale=3", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("skipped (up to date)") == 6


@pytest.mark.parametrize("args,code,needle", [
    (["student", "student.epoks=2"], 2, "unknown config key 'student.epoks'"),
    (["student", "--config", "nope"], 2, "unknown preset 'nope'"),
    (["student", "loss.w_micl_lat=0"], 1, "teacher checkpoint"),
    (["eval"], 1, "student checkpoint"),
    (["train"], 2, "`oal train` is now `oal student`: a stage's subcommand is its name"),
    (["evaluate"], 2, "`oal evaluate` is now `oal eval`"),
    (["nope"], 2, "no stage named 'nope'; the stages: base, teacher, diffusion, embeddings"),
])
def test_clear_errors(tmp_path, args, code, needle):
    r = oal(*args, f"output_dir={tmp_path}", cwd=tmp_path)
    assert r.returncode == code and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# every stage of the pipeline by its name, in order (eval_base: `eval --of base`), then the pipeline itself, the config
# printer and the scorer
COMMANDS = ("base", "teacher", "diffusion", "embeddings", "anchors", "knn", "latents", "student", "eval", "detector",
            "pipeline", "config", "score")


def test_python_dash_m_oal_help_lists_every_stage(tmp_path):
    import re

    r = oal("--help", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: oal")
    listed = re.search(r"\{([a-z,]+)\}", r.stdout).group(1).split(",")
    assert listed == list(COMMANDS)  # every stage, in pipeline order, and nothing else
    # each with its own line of help under "positional arguments"
    helped = re.findall(r"^    ([a-z]+) +\S", r.stdout.split("positional arguments:")[1], re.M)
    assert helped == list(COMMANDS)
    # and each one is a command that parses (its own --help names its options)
    from oal.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command")
    assert list(sub.choices) == list(COMMANDS)
    for name, p in sub.choices.items():
        options = {o for a in p._actions for o in a.option_strings}
        if name == "score":  # not a stage: a detector and files
            assert {"--model"} <= options and "--config" not in options
            continue
        assert {"--config", "--force", "--no-progress"} <= options, name
        assert ("--checkpoint" in options) == (name == "eval"), name
        assert p.description and p.description == next(a.help for a in sub._choices_actions if a.dest == name)


def test_tracebacks_only_for_faults_outside_the_package():
    from oal.cli import _raised_by_us
    from oal.config import DataConfig
    from oal.data import build_benchmark

    with pytest.raises(ValueError) as ours:
        build_benchmark(DataConfig(benchmark="nope"))
    with pytest.raises(RuntimeError) as theirs:
        torch.zeros(2, 3) @ torch.zeros(2, 3)  # a shape mismatch inside torch
    assert _raised_by_us(ours.value) and not _raised_by_us(theirs.value)


def test_jobs_evaluate_finds_each_kind_of_checkpoint_and_names_what_is_missing(tmp_path):
    """What `python -m jobs.evaluate` evaluates, resolved before it connects to Ray: a file, a stage folder, a Ray
    Train run folder (its newest checkpoint), a tune trial (finished, or stopped early by ASHA); else one error."""
    from jobs.evaluate import resolve
    from oal.config import load_config

    cfg = load_config("digits", [f"output_dir={tmp_path}"])
    ray_run = tmp_path / "digits-trial-abc" / "ray" / "digits-trial-abc-student"
    for d in ("checkpoint_2026-11-28_01-00-00.000001", "checkpoint_2026-11-28_01-00-09.000001"):
        (ray_run / d).mkdir(parents=True)
        (ray_run / d / "checkpoint.pt").write_bytes(b"x")
    newest = ray_run / "checkpoint_2026-11-28_01-00-09.000001" / "checkpoint.pt"
    assert resolve(cfg, str(ray_run), None)[0] == newest
    assert resolve(cfg, None, "abc") == (newest, "trial-abc")  # stopped early: its Ray Train checkpoint
    finished = tmp_path / "digits-trial-abc" / "student" / "checkpoint.pt"
    finished.parent.mkdir()
    finished.write_bytes(b"x")
    assert resolve(cfg, None, "abc")[0] == finished  # finished: its student stage
    assert resolve(cfg, str(finished.parent), None)[0] == finished
    assert resolve(cfg, str(finished), None) == (finished, "student-checkpoint")
    r = subprocess.run([sys.executable, "-m", "jobs.evaluate", f"output_dir={tmp_path}", "--trial", "nope"],
                       cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "trial 'nope' has no checkpoint" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "jobs.evaluate", f"output_dir={tmp_path}"],
                       cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no student checkpoint at" in r.stderr
