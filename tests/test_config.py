import pytest

from oal.config import PRESETS_DIR, ConfigError, OALConfig, fingerprint, load_config, to_yaml


def test_defaults_and_preset_merge():
    cfg = load_config("digits", ["student.epochs=3", "loss.w_feat_kd=2.5"])
    assert isinstance(cfg, OALConfig)
    assert cfg.student.epochs == 3 and cfg.loss.w_feat_kd == 2.5
    assert cfg.teacher.optimizer == "adamw"  # from the preset
    assert cfg.loss.w_logit_kd == 4.0  # the reference's default survives


PATHS = ["data.openood_root=/data/openood", "teacher.pretrained=/w/vit.pth", "diffusion.model=/w/sd14"]


@pytest.mark.parametrize("path", sorted(PRESETS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_preset_loads(path):
    own = ["data.root=s3://bucket/my-images"] if path.stem == "folder" else []  # the folder preset's one required key
    cfg = load_config(str(path), [] if path.stem == "digits" else PATHS + own)
    assert cfg.name == path.stem


def test_unknown_key_names_key_and_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config("digits", ["student.epoks=3"])
    msg = str(e.value)
    assert "student.epoks" in msg and "student.epochs" in msg and "student.lr" in msg


@pytest.mark.parametrize("old", sorted(__import__("oal.config").config.RENAMED))
def test_a_renamed_key_is_one_error_naming_its_new_name_on_the_command_line_and_in_a_preset(old, tmp_path):
    from oal.config import KEY_FIELDS, RENAMED

    new = RENAMED[old]
    assert new in KEY_FIELDS and old not in KEY_FIELDS
    with pytest.raises(ConfigError, match=rf"^'{old}' \(from command line\) is now '{new}': give {new}=\.\.\."):
        load_config("digits", [f"{old}=1"])
    section, key = old.split(".")
    (tmp_path / "old.yaml").write_text(f"extends: digits\n{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=rf"'{old}' \(from .*old.yaml\) is now '{new}'"):
        load_config(str(tmp_path / "old.yaml"))


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
    with pytest.raises(ConfigError, match=r"'data.root' is 's3://b/data': .*only output_dir, and data.root and "
                                        r"data.imglist of a folder or imglist dataset, may be s3://"):
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
    cfg = load_config("digits", ["output_dir=out", "teacher.checkpoint=w/teacher.pt", "diffusion.model=sd",
                                 "cluster.storage_path=s3://bucket/ray"])
    done = absolute_paths(cfg, tmp_path)
    assert done.output_dir == str(tmp_path / "out")  # an output: need not exist yet
    assert done.teacher.checkpoint == str(tmp_path / "w" / "teacher.pt")
    assert done.diffusion.model == str(tmp_path / "sd") and done.cluster.storage_path == "s3://bucket/ray"
    assert absolute_paths(load_config("digits", ["diffusion.model=builtin-ldm"]), tmp_path).diffusion.model == \
        "builtin-ldm"
    with pytest.raises(ConfigError, match=r"'diffusion.checkpoint' is 'runs/x/checkpoint.pt', which does not exist "
                                          r"\(looked for .*runs/x/checkpoint.pt\); expected an existing file"):
        absolute_paths(load_config("digits", ["diffusion.checkpoint=runs/x/checkpoint.pt"]), tmp_path)


# ---- ranges declared on the fields (issue 31) -------------------------------------------------------------------

def _numeric(f) -> bool:
    return str(f.type).replace(" | None", "") in ("int", "float")


def _outside(rng):
    """A value just outside a Range: below its lower bound, else above its upper one."""
    if rng.lo is not None:
        return rng.lo if rng.lo_open else rng.lo - 1
    return rng.hi if rng.hi_open else rng.hi + 1


def test_every_numeric_field_declares_a_range_its_default_satisfies():
    from oal.config import KEY_FIELDS, OALConfig, fields

    numeric = [(key, f, default) for key, f, default in fields(OALConfig) if _numeric(f)]
    assert len(numeric) > 60  # all sections walked, teacher/base/student included
    missing = [key for key, f, _ in numeric if "range" not in f.metadata]
    assert not missing, f"numeric keys without a declared range: {missing}"
    for key, f, default in numeric:
        assert default is None or default in f.metadata["range"], key
    assert set(KEY_FIELDS) == {key for key, _, _ in fields(OALConfig)}


def test_every_range_is_enforced_with_one_line_naming_key_value_and_range():
    """For every ranged key, the value just outside its range is refused, in one line naming the key, the value and
    the range (validate on the dataclass itself: the same loop load_config runs, a hundred keys in milliseconds)."""
    from oal.config import OALConfig, fields, validate

    for key, f, _ in fields(OALConfig):
        rng = f.metadata.get("range")
        if rng is None:
            continue
        bad = _outside(rng)
        bad = int(bad) if str(f.type).startswith("int") else float(bad)
        cfg = OALConfig()
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, bad)
        with pytest.raises(ConfigError) as e:
            validate(cfg)
        msg = str(e.value)
        assert msg.startswith(f"'{key}' is {bad!r}; expected ") and str(rng) in msg and "\n" not in msg, msg


@pytest.mark.parametrize("section", ["teacher", "base", "student", "ldm"])
def test_epochs_must_be_at_least_one(section):
    """A known surviving mutation: `epochs` dropped from the >= 1 check. 0 epochs must be refused at load."""
    with pytest.raises(ConfigError, match=rf"^'{section}\.epochs' is 0; expected an integer >= 1$"):
        load_config("digits", [f"{section}.epochs=0"])
    with pytest.raises(ConfigError, match=rf"'{section}\.epochs' is -3"):
        load_config("digits", [f"{section}.epochs=-3"])
    assert getattr(load_config("digits", [f"{section}.epochs=1"]), section).epochs == 1  # the bound itself is fine


@pytest.mark.parametrize("override,message", [
    ("student.lr=-1", "'student.lr' is -1.0; expected a number > 0"),
    ("student.lr=0", "'student.lr' is 0.0; expected a number > 0"),
    ("base.lr=-1", "'base.lr' is -1.0; expected a number > 0"),
    ("student.lr=nan", "'student.lr' is nan; expected a number > 0"),
    ("data.eval_batch_size=0", "'data.eval_batch_size' is 0; expected an integer >= 1"),
    ("student.checkpoint_every=0", "'student.checkpoint_every' is 0; expected an integer >= 1"),
    ("base.checkpoint_every=0", "'base.checkpoint_every' is 0; expected an integer >= 1"),
    ("data.num_workers=-1", "'data.num_workers' is -1; expected an integer >= 0"),
    ("knn.k=0", "'knn.k' is 0; expected an integer >= 1"),
    ("base.grad_accum_steps=0", "'base.grad_accum_steps' is 0; expected an integer >= 1"),
    ("loss.w_feat_kd=-0.5", "'loss.w_feat_kd' is -0.5; expected a number >= 0"),
    ("ldm.cond_dropout=1.5", "'ldm.cond_dropout' is 1.5; expected a number in [0, 1)"),
    ("diffusion.max_nonfinite_fraction=2", "'diffusion.max_nonfinite_fraction' is 2.0; expected a number in [0, 1]"),
    ("seed=-1", "'seed' is -1; expected an integer in [0, 2147483647]"),
    ("teacher.image_size=0", "'teacher.image_size' is 0; expected an integer >= 1 or null"),
    ("cluster.cpus_per_worker=0", "'cluster.cpus_per_worker' is 0.0; expected a number > 0"),
    ("data.on_bad_image=ignore", "'data.on_bad_image' is 'ignore'; expected one of error, skip"),
])
def test_listed_bad_values_are_refused_at_load(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("digits", [override])
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("override,message", [
    ("student.momentum=0", "'student.momentum' is 0 with student.nesterov=true; Nesterov SGD needs a momentum > 0"),
    ("knn.k=100", "'knn.k' is 100; expected smaller than embeddings.per_class_cap (100)"),
    ("knn.pic_nums=21", "'knn.pic_nums' is 21; expected at most knn.select (20)"),
    ("knn.keep_per_point=301", "'knn.keep_per_point' is 301; expected at most knn.candidates (300)"),
])
def test_fields_that_bound_each_other(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("digits", [override])
    assert str(e.value).startswith(message), str(e.value)
    assert load_config("digits", ["student.momentum=0", "student.nesterov=false"]).student.momentum == 0


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".", "/abs", "a b", "x\\y"])
def test_run_name_is_a_plain_name(name):
    with pytest.raises(ConfigError, match=r"^'name' is .*; expected a plain name") as e:
        load_config("digits", [f"name={name}"])
    assert repr(name) in str(e.value)


def test_run_name_may_use_letters_digits_dash_underscore_dot(tmp_path):
    cfg = load_config("digits", ["name=cifar100_oal-trial-ab.1", f"output_dir={tmp_path}"])
    assert cfg.run_dir.parent == tmp_path


@pytest.mark.parametrize("override,message", [
    ("student.lr=abc", "'student.lr' is 'abc' (from command line); expected a number > 0"),
    ("student.epochs=1.5", "'student.epochs' is 1.5 (from command line); expected an integer >= 1"),
    ("student.nesterov=maybe", "'student.nesterov' is 'maybe' (from command line); expected true or false"),
    ("data.root=[1,2]", "'data.root' is [1, 2] (from command line); expected a string or null"),
    ("student=3", "'student' is 3 (from command line); it is a section, not a value"),
    ("student.lr=[1", "override 'student.lr=[1' cannot be parsed"),
])
def test_wrong_type_is_one_line_without_omegaconf_internals(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("digits", [override])
    msg = str(e.value)
    assert msg.startswith(message) and "\n" not in msg, msg
    assert not any(w in msg for w in ("full_key", "object_type", "reference_type")), msg


def test_wrong_type_or_syntax_in_a_yaml_file_names_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("student:\n  epochs: 1.5\n")
    with pytest.raises(ConfigError, match=rf"^'student.epochs' is 1.5 \(from {p}\); expected an integer >= 1$"):
        load_config(str(p))
    p.write_text("student:\n  lr: [1\n")
    with pytest.raises(ConfigError, match=rf"^config file '{p}' is not valid YAML \(line \d+, column \d+\): "):
        load_config(str(p))
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="holds a list; expected a mapping"):
        load_config(str(p))


def test_help_keys_lists_every_key_with_type_default_range_and_hint():
    from oal.config import KEY_FIELDS, help_keys

    text = help_keys()
    lines = {line.split(" (", 1)[0].strip(): line for line in text.splitlines() if line.startswith("  ")}
    assert set(lines) == set(KEY_FIELDS)
    assert lines["student.epochs"] == ("  student.epochs (int; default 5; an integer >= 1): passes over the ID "
                                       "training set")
    assert lines["teacher.lr"].startswith("  teacher.lr (float; default 0.05; a number > 0): learning rate")
    assert "default 2048; an integer >= 0): training images that recompute BatchNorm" in lines["base.precise_bn"]
    # a field documented by the comment block above it, and one with choices
    assert "DataLoader processes of training" in lines["data.num_workers"]
    assert "one of error, skip" in lines["data.on_bad_image"] and "skip (left out" in lines["data.on_bad_image"]
    assert all(line.split("): ", 1)[1].strip() for line in lines.values() if "): " in line)
    assert all("): " in line for line in lines.values()), "every key has a hint from its field's comment"
    assert "[ldm] The built-in latent diffusion model" in text
    # a field of a section that extends TrainConfig: its own comment, and the inherited fields' comments
    assert "registry name: vit_b16 | vit_tiny" in lines["teacher.network"]
    assert "learning rate" in lines["teacher.lr"] and "(reference 0.005)" in lines["student.lr"]
    assert "an integer >= 0; not in fingerprints)" in lines["diffusion.grid_samples"]  # NOT_AN_INPUT, said
    assert "not in fingerprints" not in lines["diffusion.steps"]


def test_a_preset_extends_another_and_holds_only_its_differences(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: fashion\nname: child\nstudent:\n  epochs: 7\n")
    cfg, fashion = load_config(str(child)), load_config("fashion")
    assert (cfg.name, cfg.student.epochs, cfg.data.benchmark) == ("child", 7, "fashion")
    assert cfg.teacher == fashion.teacher and cfg.knn == fashion.knn and cfg.ldm == fashion.ldm
    grandchild = tmp_path / "grandchild.yaml"
    grandchild.write_text(f"extends: {child}\nname: grandchild\nldm:\n  pretrained: null\n")
    cfg = load_config(str(grandchild), ["student.lr=0.5"])  # the command line still comes last
    assert (cfg.name, cfg.student.epochs, cfg.student.lr, cfg.ldm.pretrained) == ("grandchild", 7, 0.5, None)
    # the shipped presets that extend fashion resolve to fashion plus their few keys
    shirt = load_config("fashion_shirt")
    assert shirt.data.benchmark == "fashion_shirt" and shirt.ldm.pretrained is None
    assert (shirt.teacher, shirt.base, shirt.student, shirt.knn) == (fashion.teacher, fashion.base, fashion.student,
                                                                     fashion.knn)


def test_a_bad_extends_is_one_error_naming_the_file(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"extends: {b}\nname: a\n")
    b.write_text(f"extends: {a}\nname: b\n")
    with pytest.raises(ConfigError, match=r"a.yaml' extends itself through .*a.yaml -> .*b.yaml"):
        load_config(str(a))
    b.write_text("extends: no_such_preset\nname: b\n")
    with pytest.raises(ConfigError, match=r"b.yaml' extends 'no_such_preset': unknown preset 'no_such_preset'"):
        load_config(str(a))
    b.write_text("extends: [fashion]\n")
    with pytest.raises(ConfigError, match=r"'extends' is \['fashion'\]; expected the name of a preset"):
        load_config(str(b))
