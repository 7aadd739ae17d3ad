"""The stage contract (oal.registry): one order, one skip check, and a stage added as one value."""

import json

import pytest
import torch

from oal import registry
from oal.config import load_config
from oal.storage import load_torch
from tests.conftest import QUICK


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """The quick digits pipeline, run once in this process: every stage's manifest written."""
    out = tmp_path_factory.mktemp("registry")
    cfg = load_config("digits", [*QUICK, f"output_dir={out}", "eval.plots=false"])
    results = registry.run_pipeline(cfg, progress=False)
    assert not any(r.skipped for r in results.values())
    return out


ALL = ["teacher", "embeddings", "anchors", "knn", "latents", "student", "eval", "detector"]


@pytest.mark.parametrize("override, redone", [
    ("cluster.shards=3", []),  # how Ray would split the work: read by no stage's outputs
    ("diffusion.grid_samples=3", []),  # the latents' look-only grid: not what is sampled
    ("detector.id_tpr=0.9", ["detector"]),
    ("diffusion.steps=3", ["latents", "student", "eval", "detector"]),  # the sampler: not the anchors, the k-NN
    ("weights=best", ["embeddings", "anchors", "knn", "latents", "student", "eval", "detector"]),  # not the teacher
    ("eval.ebo_temperature=2", ["eval", "detector"]),
    ("knn.select=4", ["knn", "latents", "student", "eval", "detector"]),
    ("teacher.lr=0.02", ["teacher", "embeddings", "anchors", "knn", "latents", "student", "eval", "detector"]),
])
def test_a_key_a_stage_does_not_read_leaves_it_skipped_one_it_reads_redoes_it_and_what_follows(done, override, redone):
    # each case in a copy of the finished run, so that no case sees another's redone stages
    import shutil

    case = done.parent / f"case-{override.replace('=', '-')}"
    shutil.copytree(done, case)
    cfg = load_config("digits", [*QUICK, f"output_dir={case}", "eval.plots=false", override])
    results = registry.run_pipeline(cfg, progress=False)
    assert list(results) == ALL  # the order, written once (registry.STAGES), with the stages this config needs
    assert [name for name, r in results.items() if not r.skipped] == redone


def test_a_new_stage_is_one_value_in_the_registry(done, monkeypatch, tmp_path):
    """tests/stage_job.py's stage (after the embeddings stage), in this process; on Ray through `ray job submit`,
    tracked: test_tracking."""
    import shutil

    from tests import stage_job

    monkeypatch.setattr(registry, "STAGES", stage_job.with_stage(registry.STAGES))  # the one entry
    shutil.copytree(done, tmp_path / "run")
    cfg = load_config("digits", [*QUICK, f"output_dir={tmp_path / 'run'}", "eval.plots=false"])
    results = registry.run_pipeline(cfg, progress=False)
    assert list(results) == ["teacher", "embeddings", "feature_stats", *ALL[2:]]
    assert [n for n, r in results.items() if not r.skipped] == ["feature_stats"]  # the others were done already
    manifest = json.loads((tmp_path / "run" / cfg.name / "feature_stats" / "stage.json").read_text())
    assert manifest["fingerprint"] == results["feature_stats"].fingerprint and manifest["classes"] == 6
    emb = load_torch(tmp_path / "run" / cfg.name / "embeddings" / "id_embeddings.pt", "emb")["embeddings"]
    got = load_torch(results["feature_stats"].outputs["stats"], "stats")["mean_norm"]
    assert torch.allclose(got, emb.float().norm(dim=-1).mean(dim=1)) and got.shape == (emb.shape[0],)
    # alone by name, skipped when up to date; with a new teacher it is redone with the embeddings it reads
    assert registry.run_stage("feature_stats", cfg).skipped
    again = load_config("digits", [*QUICK, f"output_dir={tmp_path / 'run'}", "eval.plots=false", "teacher.lr=0.02"])
    redone = registry.run_pipeline(again, progress=False)
    assert not redone["feature_stats"].skipped and redone["feature_stats"].fingerprint != manifest["fingerprint"]


def test_a_stage_reads_another_through_its_manifest_and_names_it_when_missing(tmp_path):
    cfg = load_config("digits", [*QUICK, f"output_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r"the embeddings stage has not finished: no manifest in .* naming "
                                                r"its output 'embeddings'; run it first"):
        registry.run_stage("anchors", cfg)
    with pytest.raises(ValueError, match="no stage named 'embed'; the stages: base, teacher, diffusion, embeddings"):
        registry.run_stage("embed", cfg)


def test_a_fingerprint_is_derived_from_what_the_stage_declares():
    """Sections read (less NOT_AN_INPUT fields), the stages read after (their identity: a given file in their
    place, else their fingerprint), and the version; nothing else."""
    cfg = load_config("digits", QUICK)
    stage = registry.Stage("x", "training", reads=("knn", "seed"), after=("teacher",))

    def fp(*overrides, of=stage):
        return registry.fingerprint(of, load_config("digits", [*QUICK, *overrides]))

    assert fp() == registry.fingerprint(stage, cfg)
    assert fp("knn.k=4") != fp() and fp("seed=1") != fp() and fp("teacher.epochs=9") != fp()
    assert fp("diffusion.steps=9") == fp() and fp("eval.knn_k=3") == fp()
    assert fp(of=registry.Stage("x", "training", reads=("knn", "seed"), after=("teacher",), version=2)) != fp()
    # a file given in the teacher's place: the teacher's settings no longer count, that file does
    ckpt = f"teacher.checkpoint={__file__}"
    assert fp(ckpt) != fp() and fp(ckpt, "teacher.epochs=9") == fp(ckpt)
    latents = registry.named("latents")
    assert fp("diffusion.grid_samples=1", of=latents) == fp(of=latents)  # declared NOT_AN_INPUT
    assert fp("diffusion.batch_size=1", of=latents) == fp(of=latents)
    assert fp("diffusion.steps=1", of=latents) != fp(of=latents)


def test_the_training_stages_are_the_registrys():
    from oal.stages import TRAINING_STAGES

    assert sorted(TRAINING_STAGES) == sorted(s.name for s in registry.STAGES if s.runs == "training")


def test_a_stage_declares_how_it_runs_and_its_work():
    with pytest.raises(ValueError, match="stage x: runs='batch'; expected one of training, sharded, whole, actors"):
        registry.Stage("x", "batch")
    with pytest.raises(ValueError, match=r"stage x runs sharded and declares no work: give work=.*\(shard function"):
        registry.Stage("x", "sharded")
    with pytest.raises(ValueError, match=r"stage x reads 'teachers', which is no config section or key; expected "
                                         r"one of name, .*, teacher, "):
        registry.Stage("x", "training", reads=("data", "teachers"))


def test_plan_runs_what_the_config_needs_in_order():
    cfg = load_config("digits", QUICK)
    assert [s.name for s in registry.plan(cfg)] == ALL
    plain = load_config("digits", [*QUICK, "loss.w_micl_knn=0", "loss.w_micl_lat=0", "eval.baseline=true",
                                   "student.init=base"])
    assert [s.name for s in registry.plan(plain)] == ["base", "teacher", "student", "eval_base", "eval", "detector"]
    assert [s.name for s in registry.plan(cfg, first="student")] == ["student", "eval", "detector"]
    assert [s.name for s in registry.plan(cfg, last="latents")] == ALL[:5]
