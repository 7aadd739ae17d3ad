"""Bad input gets one clear line, never a traceback (issue 31): config values through the real `oal` command line
and `python -m jobs.*` (exit code 2), a given data folder that does not exist, and unreadable images in an
OpenOOD list (`data.on_bad_image`: error naming the file and its list, or skip with the count logged)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from oal.config import DataConfig
from oal.data import DataError, build_benchmark
from tests.realdata import make_openood_tree

REPO = Path(__file__).parents[1]


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def one_error_line(stderr: str) -> str:
    """The stderr of a refused command: no traceback, exactly one line that is not a log record."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1, stderr
    return lines[0]


# ---- config errors: the `oal` command line and the Ray jobs, exit code 2 ------------------------------------------

@pytest.mark.parametrize("override,needle", [
    ("base.lr=-1", "'base.lr' is -1.0; expected a number > 0"),  # was torch's optimizer traceback
    ("base.checkpoint_every=0", "'base.checkpoint_every' is 0; expected an integer >= 1"),  # was a ZeroDivisionError
    ("student.lr=-1", "'student.lr' is -1.0; expected a number > 0"),
    ("data.eval_batch_size=0", "'data.eval_batch_size' is 0; expected an integer >= 1"),
    ("student.checkpoint_every=0", "'student.checkpoint_every' is 0; expected an integer >= 1"),
    ("data.num_workers=-1", "'data.num_workers' is -1; expected an integer >= 0"),
    ("knn.k=0", "'knn.k' is 0; expected an integer >= 1"),
    ("base.grad_accum_steps=0", "'base.grad_accum_steps' is 0; expected an integer >= 1"),
    ("base.epochs=0", "'base.epochs' is 0; expected an integer >= 1"),
    ("name=../../escape", "'name' is '../../escape'; expected a plain name"),
    ("student.lr=abc", "'student.lr' is 'abc' (from command line); expected a number > 0"),
    ("student.epochs=1.5", "'student.epochs' is 1.5 (from command line); expected an integer >= 1"),
])
def test_oal_refuses_bad_config_in_one_line_with_exit_2(tmp_path, override, needle):
    r = run("-m", "oal", "base", "--no-progress", f"output_dir={tmp_path}", override, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert one_error_line(r.stderr).startswith(f"oal: config error: {needle}"), r.stderr
    assert not any(tmp_path.iterdir()), "nothing ran: no run folder"
    assert not (tmp_path.parent.parent / "escape").exists()


def test_given_data_folder_that_does_not_exist_is_a_config_error(tmp_path):
    """It used to train on the cached Fashion-MNIST copy instead."""
    r = run("-m", "oal", "teacher", "--config", "fashion", f"output_dir={tmp_path}", f"data.root={tmp_path}/nowhere",
            cwd=tmp_path)
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert line.startswith("oal: config error: 'data.root' is ") and f"{tmp_path}/nowhere" in line
    assert not (tmp_path / "fashion").exists()
    r = run("-m", "oal", "base", f"output_dir={tmp_path}", "data.benchmark=cifar10",
            f"data.openood_root={tmp_path}/none", cwd=tmp_path)
    assert r.returncode == 2 and "'data.openood_root' is " in one_error_line(r.stderr)


@pytest.mark.parametrize("job,override,needle", [
    ("jobs.train", "data.root=/nonexistent/fashion", "config error: 'data.root' is '/nonexistent/fashion'"),
    ("jobs.pipeline", "student.lr=abc", "config error: 'student.lr' is 'abc' (from command line)"),
])
def test_ray_jobs_refuse_bad_config_in_one_line_with_exit_2(tmp_path, job, override, needle):
    """Refused before connecting to Ray: no cluster is needed for this test."""
    r = run("-m", job, "--config", "fashion", f"output_dir={tmp_path}", override, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert one_error_line(r.stderr).startswith(needle), r.stderr


def test_oal_config_help_keys(tmp_path):
    from oal.config import KEY_FIELDS

    r = run("-m", "oal", "config", "--help-keys", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    listed = [line.split(" (", 1)[0].strip() for line in r.stdout.splitlines() if line.startswith("  ")]
    assert sorted(listed) == sorted(KEY_FIELDS)
    assert "  knn.k (int; default 300; an integer >= 1): K of the K-th nearest-neighbour distance" in r.stdout


# ---- data folders and files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["root", "openood_root"])
def test_build_benchmark_refuses_a_given_folder_that_does_not_exist(tmp_path, key):
    with pytest.raises(FileNotFoundError, match=rf"data.{key} is '{tmp_path}/gone', which is not an existing folder"):
        build_benchmark(DataConfig(benchmark="fashion", **{key: str(tmp_path / "gone")}))


def test_fashion_never_swaps_a_given_folder_for_another_copy(tmp_path):
    from oal.data import fashion

    with pytest.raises(FileNotFoundError) as e:
        fashion.find_dir(str(tmp_path))  # exists, holds no idx files
    msg = str(e.value)
    assert str(tmp_path) in msg and str(fashion.DEBIAN_DIR) not in msg and "data.root" in msg


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A cifar10 OpenOOD tree (20 training images) with one listed training PNG that is a text file and one that is
    a PNG cut short (its header reads, its pixels do not)."""
    t = make_openood_tree(tmp_path_factory.mktemp("openood"), "cifar10", train_per_class=2, val_per_class=1,
                          test_per_class=1, ood_per_set=2)
    rows = t["lists"]["train_cifar10"].read_text().splitlines()
    text_file = t["images_dir"] / rows[3].rsplit(" ", 1)[0]
    text_file.write_text("not an image\n")
    cut = t["images_dir"] / rows[7].rsplit(" ", 1)[0]
    cut.write_bytes(cut.read_bytes()[:80])
    return {**t, "text_file": text_file, "text_line": 4, "cut": cut, "cut_line": 8}


def _epoch(ds, workers: int) -> int:
    """Images in one pass of a DataLoader; its worker processes stopped even when a batch fails (else they linger
    until the exception that references the loader is collected, seconds later)."""
    it = iter(DataLoader(ds, batch_size=4, num_workers=workers))
    try:
        return sum(len(x) for x, _ in it)
    finally:
        if workers:
            it._shutdown_workers()


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_listed_image_is_one_line_naming_file_and_list(tree, workers):
    bench = build_benchmark(DataConfig(benchmark="cifar10", openood_root=str(tree["root"])))
    assert len(bench.train) == 20  # error mode reads nothing up front
    with pytest.raises(DataError) as e:
        _epoch(bench.train, workers)  # through a DataLoader worker process too
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert msg.startswith(f"image '{tree['text_file']}' (line {tree['text_line']} of {tree['lists']['train_cifar10']})"
                          f" cannot be read: UnidentifiedImageError"), msg
    assert msg.endswith("replace or remove it, or set data.on_bad_image=skip")


def test_truncated_image_is_the_same_kind_of_error(tree):
    bench = build_benchmark(DataConfig(benchmark="cifar10", openood_root=str(tree["root"])))
    with pytest.raises(DataError, match=rf"^image '{tree['cut']}' \(line {tree['cut_line']} of .*train_cifar10.txt\)"):
        bench.train[7]


def test_skip_leaves_out_unreadable_images_and_logs_the_count(tree, caplog):
    with caplog.at_level(logging.WARNING, logger="oal.data.cifar"):
        bench = build_benchmark(DataConfig(benchmark="cifar10", openood_root=str(tree["root"]), on_bad_image="skip"))
    assert len(bench.train) == 19 and bench.train.skipped == 1  # the text file: its header is not an image's
    assert str(tree["text_file"]) not in {str(p) for p, _ in bench.train.items}
    assert len(bench.train_plain) == 19 and len(bench.test) == 10
    logged = [r.getMessage() for r in caplog.records if "train_cifar10.txt" in r.getMessage()]
    assert len(logged) == 1 and "left out 1 of 20 images listed in" in logged[0] and str(tree["text_file"]) in logged[0]
    # the cut PNG's header reads: it is found when read, and replaced by the list's next readable image
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="oal.data.cifar"):
        assert _epoch(bench.train, 0) == 19
    assert bench.train.skipped == 2 and any(str(tree["cut"]) in r.getMessage() for r in caplog.records)
    j = next(i for i, (p, _) in enumerate(bench.train.items) if p == tree["cut"])
    x, label = bench.train_plain[j]
    assert torch.equal(x, bench.train_plain[j + 1][0]) and label == bench.train.items[j][1]


def test_dataloader_reraise_keeps_the_one_line_message():
    """torch re-raises a worker's exception as the same type built from a text with the worker's traceback."""
    from torch._utils import ExceptionWrapper

    try:
        raise DataError("image '/d/x.png' (line 3 of /d/list.txt) cannot be read: OSError: broken")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as e:
        wrapped.reraise()
    assert str(e.value) == "image '/d/x.png' (line 3 of /d/list.txt) cannot be read: OSError: broken"


def test_oal_stage_on_a_bad_image_prints_one_line_naming_it(tree, tmp_path):
    """Through the command line, with DataLoader worker processes: the user sees the file and the list, no traceback
    through the DataLoader (exit code 1: the config was fine, the data is not)."""
    r = run("-m", "oal", "teacher", "--no-progress", f"output_dir={tmp_path}", "data.benchmark=cifar10",
            f"data.openood_root={tree['root']}", "data.num_workers=2", "data.batch_size=4", "teacher.epochs=1",
            "teacher.network=resnet_tiny", "teacher.precise_bn=0", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "Original" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("oal teacher: error:")]
    assert len(errors) == 1 and str(tree["lists"]["train_cifar10"]) in errors[0], r.stderr
    assert str(tree["text_file"]) in errors[0] or str(tree["cut"]) in errors[0]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_on_a_bad_image_ends_with_one_line_naming_it(stack, tree, tmp_path):
    """The same image read in a Ray Train worker: under Ray's wrappers (a worker-group failure) the job's own last
    stderr line names the file and its list, exit code 1. Ray's log streaming of the workers' copies of the error
    (lines tagged `(Name pid=N)`) may still trail it: its summary of repeated lines ("[repeated 2x across cluster]")
    is flushed on a timer (1 run in 6 at the default 2 s Train poll, 3 in 3 at the session's 0.5 s)."""
    env = {**os.environ, **stack.env, "PYTHONPATH": str(REPO), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}
    r = subprocess.run([sys.executable, "-m", "jobs.train", "--stage", "teacher", "--no-progress",
                        f"output_dir={tmp_path}", "data.benchmark=cifar10", f"data.openood_root={tree['root']}",
                        "data.batch_size=4", "teacher.epochs=1", "teacher.network=resnet_tiny", "teacher.precise_bn=0",
                        "cluster.max_failures=0", "cluster.cpus_per_worker=1"],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    own = [line for line in r.stderr.strip().splitlines() if not re.match(r"(\x1b\[\d+m)?\([^)]*pid=\d+\)", line)]
    last = own[-1]
    assert last.startswith("jobs.train: data error: image '"), r.stderr[-3000:]
    assert sum(line.startswith("jobs.train: data error:") for line in own) == 1
    assert str(tree["lists"]["train_cifar10"]) in last and (str(tree["text_file"]) in last or str(tree["cut"]) in last)
