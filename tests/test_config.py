import pytest

from oal.config import PRESETS_DIR, ConfigError, OALConfig, fingerprint, load_config, to_yaml


def test_defaults_and_preset_merge():
    cfg = load_config("digits", ["student.epochs=3", "loss.w_feat_kd=2.5"])
    assert isinstance(cfg, OALConfig)
    assert cfg.student.epochs == 3 and cfg.loss.w_feat_kd == 2.5
    assert cfg.teacher.optimizer == "adamw"  # from the preset
    assert cfg.loss.w_logit_kd == 4.0  # the reference's default survives


PATHS = ["data.openood_root=/data/openood", "model.teacher_pretrained=/w/vit.pth", "diffusion.model=/w/sd14"]


@pytest.mark.parametrize("path", sorted(PRESETS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_preset_loads(path):
    cfg = load_config(str(path), [] if path.stem == "digits" else PATHS)
    assert cfg.name == path.stem


def test_unknown_key_names_key_and_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config("digits", ["student.epoks=3"])
    msg = str(e.value)
    assert "student.epoks" in msg and "student.epochs" in msg and "student.lr" in msg


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="'bogus'.*valid keys here: name, output_dir"):
        load_config(None, ["bogus=1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="student.epochs"):
        load_config("digits", ["student.epochs=many"])


def test_bad_choice_and_range():
    with pytest.raises(ConfigError, match="loss.club_training.*reference, loglik"):
        load_config(None, ["loss.club_training=maybe"])
    with pytest.raises(ConfigError, match="loss.w_micl_knn"):
        load_config(None, ["loss.w_micl_knn=-1"])
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(None, ["data.batch_size=0"])
    with pytest.raises(ConfigError, match="'student.precise_bn' is -1; expected an integer >= 0"):
        load_config(None, ["student.precise_bn=-1"])
    with pytest.raises(ConfigError, match=r"'cluster.shards' is -1; expected an integer >= 0 \(0 means one per training"):
        load_config(None, ["cluster.shards=-1"])
    assert load_config(None, ["cluster.shards=0"]).cluster.shards == 0
    # output_dir may be s3://bucket[/prefix] (oal.storage); another scheme, or any other path key as a URI, is refused
    assert load_config(None, ["output_dir=s3://bucket/runs"]).ray_storage == "s3://bucket/runs/digits/ray"
    for bad in ("gs://bucket/runs", "s3://", "s3:///"):
        with pytest.raises(ConfigError, match=rf"'output_dir' is '{bad}'; expected a local or mounted path, or s3://"):
            load_config(None, [f"output_dir={bad}"])
    with pytest.raises(ConfigError, match=r"'data.root' is 's3://b/data': .*only output_dir may be s3://"):
        load_config(None, ["data.root=s3://b/data"])
    assert load_config(None, ["cluster.storage_path=s3://bucket/ray"]).cluster.storage_path == "s3://bucket/ray"


def test_override_without_equals_and_unknown_preset():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["student.epochs"])
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*digits"):
        load_config("nope")


def test_fingerprint_tracks_values_and_yaml_roundtrip(tmp_path):
    a, b = load_config("digits"), load_config("digits", ["seed=1"])
    assert fingerprint(a) == fingerprint(load_config("digits"))
    assert fingerprint(a) != fingerprint(b)
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(b))
    assert load_config(str(p)) == b


def test_absolute_paths_for_ray_workers_and_missing_inputs_named(tmp_path):
    """Ray workers run in other folders: given files become absolute against the driver's folder; one that does not
    exist is a ConfigError naming the key before anything runs. Built-in model names and URIs are left alone."""
    from oal.config import absolute_paths

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "teacher.pt").write_bytes(b"x")
    (tmp_path / "sd").mkdir()
    cfg = load_config("digits", ["output_dir=out", "model.teacher_checkpoint=w/teacher.pt", "diffusion.model=sd",
                                 "cluster.storage_path=s3://bucket/ray"])
    done = absolute_paths(cfg, tmp_path)
    assert done.output_dir == str(tmp_path / "out")  # an output: need not exist yet
    assert done.model.teacher_checkpoint == str(tmp_path / "w" / "teacher.pt")
    assert done.diffusion.model == str(tmp_path / "sd") and done.cluster.storage_path == "s3://bucket/ray"
    assert absolute_paths(load_config("digits", ["diffusion.model=builtin-ldm"]), tmp_path).diffusion.model == \
        "builtin-ldm"
    with pytest.raises(ConfigError, match=r"'diffusion.checkpoint' is 'runs/x/checkpoint.pt', which does not exist "
                                          r"\(looked for .*runs/x/checkpoint.pt\); expected an existing file"):
        absolute_paths(load_config("digits", ["diffusion.checkpoint=runs/x/checkpoint.pt"]), tmp_path)
