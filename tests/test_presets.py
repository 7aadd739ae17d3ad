"""The paper presets against the reference implementation (HengGao12/OAL at 16487e8, on OpenOOD v1.5).

Each row: preset, key, the reference's value, and the reference file it is read from. A preset field that
drifts from the reference fails here, whether the preset sets it or inherits it from the paper preset it extends;
so does a preset that extends anything else (digits or fashion)."""

from __future__ import annotations

from functools import cache

import pytest
from omegaconf import DictConfig, OmegaConf

from oal.config import PRESETS_DIR, ConfigError, load_config

PATHS = ["data.openood_root=/data/openood", "teacher.pretrained=/w/vit_b16.pth", "diffusion.model=/w/sd-v1-4"]
CIFAR = ("cifar100_oal", "cifar10_oal", "cifar100_32", "cifar10_32")
ALL = (*CIFAR, "imagenet200_oal")

# (presets, key, reference value, reference file)
REFERENCE = [
    # the OAL student: configs/pipelines/train/oal_pipeline.yml and openood/trainers/oal_trainer.py
    (ALL, "student.epochs", 100, "configs/pipelines/train/oal_pipeline.yml"),
    (ALL, "student.lr", 0.005, "configs/pipelines/train/oal_pipeline.yml"),
    (ALL, "student.optimizer", "sgd", "openood/trainers/oal_trainer.py"),
    (ALL, "student.momentum", 0.9, "openood/trainers/oal_trainer.py"),
    (ALL, "student.nesterov", True, "openood/trainers/oal_trainer.py"),
    (ALL, "student.weight_decay", 5e-4, "openood/trainers/oal_trainer.py"),
    (ALL, "student.dt_lr", 0.01, "openood/trainers/oal_trainer.py"),
    (ALL, "student.club_lr", 1e-4, "openood/trainers/oal_trainer.py"),
    (ALL, "student.precise_bn", 0, "openood/trainers/oal_trainer.py (no BatchNorm recalibration)"),
    (ALL, "student.init", "base", "configs/pipelines/train/oal_pipeline.yml (pretrained: True)"),
    (ALL, "loss.w_logit_kd", 4.0, "openood/trainers/oal_trainer.py"),
    (ALL, "loss.w_feat_kd", 8.0, "openood/trainers/oal_trainer.py"),
    (ALL, "loss.w_micl_knn", 0.1, "openood/trainers/oal_trainer.py"),
    (ALL, "loss.w_micl_lat", 0.2, "openood/trainers/oal_trainer.py"),
    (ALL, "loss.w_energy_knn", 0.0, "openood/trainers/oal_trainer.py (energy_rl = False)"),
    (ALL, "loss.w_energy_lat", 0.0, "openood/trainers/oal_trainer.py (energy_rl = False)"),
    (ALL, "loss.kd_temperature", 1.0, "openood/trainers/oal_trainer.py"),
    (ALL, "loss.club_training", "reference", "openood/trainers/oal_trainer.py"),
    (ALL, "loss.outlier_batch_size", 128, "openood/trainers/oal_trainer.py"),
    (CIFAR, "data.batch_size", 128, "configs/datasets/cifar100/cifar100_224x224.yml"),
    (CIFAR, "data.eval_batch_size", 200, "configs/datasets/cifar100/cifar100_224x224.yml"),
    (("imagenet200_oal",), "data.batch_size", 256, "configs/datasets/imagenet200/imagenet200.yml"),
    (("cifar100_oal", "cifar10_oal", "imagenet200_oal"), "data.image_size", 224,
     "configs/datasets/cifar100/cifar100_224x224.yml"),
    (("cifar100_oal", "cifar10_oal", "imagenet200_oal"), "model.student", "resnet18_224",
     "configs/networks/resnet18_224x224.yml"),
    (ALL, "teacher.network", "vit_b16", "openood/trainers/oal_trainer.py (timm VisionTransformer)"),
    (ALL, "teacher.image_size", 224, "openood/trainers/oal_trainer.py"),
    # the base (CE) student: configs/pipelines/train/baseline.yml
    (CIFAR, "base.epochs", 100, "configs/pipelines/train/baseline.yml"),
    (("imagenet200_oal",), "base.epochs", 90, "scripts/ood/ebo/imagenet200_test_ood_ebo.sh (base_e90)"),
    (ALL, "base.lr", 0.1, "configs/pipelines/train/baseline.yml"),
    (ALL, "base.optimizer", "sgd", "openood/trainers/base_trainer.py"),
    (ALL, "base.momentum", 0.9, "configs/pipelines/train/baseline.yml"),
    (ALL, "base.nesterov", True, "configs/pipelines/train/baseline.yml"),
    (ALL, "base.weight_decay", 5e-4, "configs/pipelines/train/baseline.yml"),
    # the teacher fine-tune: configs/pipelines/train/in_cifar100_finetune.yml, openood/trainers/finetune_trainer.py
    (ALL, "teacher.epochs", 50, "configs/pipelines/train/in_cifar100_finetune.yml"),
    (ALL, "teacher.optimizer", "adam", "openood/trainers/finetune_trainer.py"),
    (ALL, "teacher.lr", 1e-6, "openood/trainers/finetune_trainer.py (backbone)"),
    (ALL, "teacher.head_lr", 1e-4, "configs/pipelines/train/in_cifar100_finetune.yml"),
    (ALL, "teacher.weight_decay", 0.0, "openood/trainers/finetune_trainer.py"),
    # k-NN boundary sampling: scripts/get_embed_cifar100.py, scripts/get_embed_cifar10.py
    (ALL, "knn.k", 300, "scripts/get_embed_cifar100.py (--K_in_knn)"),
    (ALL, "knn.select", 50, "scripts/get_embed_cifar100.py (--ood_det_select)"),
    (ALL, "knn.sigma", 0.07, "scripts/get_embed_cifar100.py (--gaussian_mag_ood_det)"),
    (ALL, "knn.pic_nums", 50, "scripts/get_embed_cifar100.py"),
    (ALL, "knn.candidates", 1500, "scripts/get_embed_cifar100.py"),
    (ALL, "knn.keep_per_point", 2, "scripts/get_embed_cifar100.py (ID_points_num)"),
    (ALL, "embeddings.per_class_cap", 500, "scripts/get_id_features_cifar100.py"),
    (("cifar100_oal", "cifar100_32"), "knn.rounds", 100, "scripts/get_embed_cifar100.py"),
    (("cifar10_oal", "cifar10_32"), "knn.rounds", 10, "scripts/get_embed_cifar10.py"),
    (("imagenet200_oal",), "knn.rounds", 25, "scripts/get_embed_in1k.py"),
    (("cifar100_oal", "cifar100_32"), "anchors.norm", "token_embedding", "token_embed_c100.npy"),
    (("cifar10_oal", "cifar10_32"), "anchors.norm", "encoder_mean", "token_embed_c10.npy"),
    (("imagenet200_oal",), "anchors.norm", "encoder_mean", "outlier_generation/scripts/get_token_embed.py"),
    # Stable Diffusion sampling: outlier_generation/outlier_generate.py, generate_outliers_in_pixel_space.sh
    (ALL, "diffusion.prompt", "A high-quality image of the {}", "outlier_generation/outlier_generate.py"),
    (ALL, "diffusion.scheduler", "pndm", "outlier_generation/generate_outliers_in_pixel_space.sh (--plms)"),
    (ALL, "diffusion.steps", 50, "outlier_generation/outlier_generate.py (--ddim_steps)"),
    (ALL, "diffusion.guidance_scale", 7.5, "outlier_generation/outlier_generate.py (--scale)"),
    (ALL, "diffusion.num_outliers", 300, "outlier_generation/generate_outliers_in_pixel_space.sh (100 x 3)"),
    (ALL, "diffusion.batch_size", 3, "outlier_generation/generate_outliers_in_pixel_space.sh (--n_samples)"),
    (ALL, "diffusion.resolution", 512, "outlier_generation/outlier_generate.py (H = W = 512)"),
    (ALL, "diffusion.reduction", "channel_row_mean", "outlier_generation/outlier_generate.py + oal_trainer.py"),
    (ALL, "diffusion.mode", "latent", "openood/trainers/oal_trainer.py"),
    # evaluation: openood/recorders/base_recorder.py, configs/postprocessors/ebo.yml
    (ALL, "weights", "best", "openood/recorders/base_recorder.py (best.ckpt)"),
    (ALL, "eval.primary", "ebo", "scripts/ood/ebo/cifar100_test_ood_ebo.sh"),
    (ALL, "eval.ebo_temperature", 1.0, "configs/postprocessors/ebo.yml"),
]
ROWS = [(p, key, value, source) for presets, key, value, source in REFERENCE for p in presets]


@cache
def resolved(preset: str) -> DictConfig:
    return OmegaConf.structured(load_config(preset, PATHS))


@pytest.mark.parametrize(("preset", "key", "value", "source"), ROWS,
                         ids=[f"{p}:{k}" for p, k, _, _ in ROWS])
def test_preset_field_is_the_reference_value(preset, key, value, source):
    assert OmegaConf.select(resolved(preset), key) == pytest.approx(value), f"{preset}: {key} differs from {source}"


@pytest.mark.parametrize("preset", ALL)
def test_preset_extends_only_paper_presets_and_comments_every_field(preset):
    text = (PRESETS_DIR / f"{preset}.yaml").read_text()
    assert "digits" not in text  # nothing inherited from the smoke preset
    raw = OmegaConf.to_container(OmegaConf.load(PRESETS_DIR / f"{preset}.yaml"))
    assert raw.get("extends", "cifar100_oal") in ALL  # the chain stays among the reference recipes
    leaves = [line for line in text.splitlines() if ":" in line and not line.strip().startswith("#")
              and not line.rstrip().endswith(":") and not line.strip().endswith("# ")]
    assert all("#" in line for line in leaves if "name:" not in line), "every field carries a comment"
    assert raw["name"] == preset  # its own run folder, never runs/digits


@pytest.mark.parametrize("preset", ALL)
def test_preset_without_paths_names_each_missing_key(preset):
    with pytest.raises(ConfigError) as e:
        load_config(preset)
    msg = str(e.value)
    for key in ("data.openood_root", "teacher.pretrained", "diffusion.model"):
        assert f"'{key}'" in msg and f"{key}=..." in msg
    with pytest.raises(ConfigError, match="needs 'diffusion.model'") as e:
        load_config(preset, PATHS[:2])
    assert "openood_root" not in str(e.value)


def test_user_gives_only_paths_and_cluster():
    cfg = load_config("cifar100_32", [*PATHS, "cluster.num_workers=8", "seed=2"])
    assert (cfg.data.image_size, cfg.model.student, cfg.teacher.image_size) == (32, "resnet18_32", 224)
    assert cfg.cluster.num_workers == 8 and cfg.seed == 2 and cfg.cluster.use_gpu
