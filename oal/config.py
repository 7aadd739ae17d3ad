"""Typed configuration: dataclass defaults <- YAML preset <- dotted command-line overrides.

Every field carries a one-line docstring-style comment; `oal config --help-keys` prints them.
Library functions take the narrowest piece (e.g. `LossConfig`), never the whole tree.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

PRESETS_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, with the offending key named in the message."""


@dataclass
class DataConfig:
    benchmark: str = "digits"  # registry name: digits | fashion | cifar10 | cifar100 | imagenet200
    # dataset folder (torchvision CIFAR layout; for fashion: the idx files, flat or FashionMNIST/raw); unused by
    # digits and with openood_root
    root: str | None = None
    # OpenOOD v1.5 data folder (benchmark_imglist/, images_classic/ or images_largescale/): ID train/val/test come
    # from its lists (the leaderboard's split) and the OOD sets too; without it CIFAR comes from data.root
    openood_root: str | None = None
    image_size: int = 32  # side of the square input the student sees (32 or 224 for CIFAR)
    batch_size: int = 64  # ID images per step (reference 128)
    eval_batch_size: int = 256  # images per forward pass during evaluation
    # DataLoader processes of training, validation, embeddings and evaluation (each shard): 0 for the embedded
    # in-memory sets, 4-8 in the image-folder presets. Not persistent across epochs: a resumed run then draws
    # the same augmentation seeds as an uninterrupted one
    num_workers: int = 0
    split_seed: int = 0  # seed of the digits and fashion benchmarks' splits
    train_per_class: int | None = None  # cap on ID training images per class (fashion; None: all)


@dataclass
class ModelConfig:
    student: str = "resnet_tiny"  # registry name: resnet18_32 | resnet18_224 | resnet_tiny
    teacher: str = "vit_tiny"  # registry name: vit_b16 | vit_tiny | resnet_tiny
    teacher_pretrained: str | None = None  # local weights file for the teacher's backbone (e.g. ViT-B/16 IN-21k)
    teacher_checkpoint: str | None = None  # the fine-tuned teacher; default <output_dir>/<name>/teacher/checkpoint.pt
    # Side of the teacher's input; the student's batch is resized to it (reference: 224 whatever the student's
    # size). None: the student's data.image_size
    teacher_image_size: int | None = None
    # The OAL student's starting weights: scratch (random) | base (the base stage's CE-trained student, as the
    # reference fine-tunes a CE-trained ResNet-18)
    student_init: str = "scratch"
    base_checkpoint: str | None = None  # the CE-trained student; default <output_dir>/<name>/base/checkpoint.pt


@dataclass
class TrainConfig:
    epochs: int = 5  # passes over the ID training set
    optimizer: str = "sgd"  # sgd (reference: Nesterov SGD) | adam (reference teacher) | adamw (ViTs from scratch)
    lr: float = 0.005  # learning rate of the network being trained (reference 0.005)
    head_lr: float | None = None  # learning rate of the classifier head; None: lr (reference teacher: 1e-4)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum
    weight_decay: float = 5e-4  # L2 penalty on the network's weights
    dt_lr: float = 0.01  # learning rate of the DT projector (reference 0.01)
    club_lr: float = 1e-4  # learning rate of the CLUB q-networks (reference 1e-4)
    grad_accum_steps: int = 1  # optimizer step every N batches
    # auto: bf16 autocast on a GPU that has it (Ampere and later), none on a CPU (the reference trains in fp32: "no")
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16 (fp16 only on GPU)
    # The frozen teacher of the OAL student's training (KD targets): auto is a bf16 copy of its weights (cast once,
    # not per op as autocast casts) where the run's mixed precision is bf16, else fp32 (under fp16: autocast)
    teacher_dtype: str = "auto"  # auto | fp32 | bf16
    channels_last: bool = True  # networks and image batches in channels-last layout on a GPU (a CPU run ignores it)
    checkpoint_every: int = 1  # save a resumable checkpoint every N epochs
    precise_bn: int = 2048  # training images that recompute BatchNorm statistics after each epoch (0: off)


@dataclass
class LossConfig:
    w_logit_kd: float = 4.0  # weight of KL(teacher logits || student logits) (reference 4)
    w_feat_kd: float = 8.0  # weight of KL(DT(teacher features) || student features) (reference 8)
    w_micl_knn: float = 0.1  # weight of CLUB(k-NN outliers -> student features) (reference 0.1)
    w_micl_lat: float = 0.2  # weight of deep CLUB(latent outliers -> student features) (reference 0.2)
    # The reference's energy_rl variant (its scripts use it instead of the two CLUB terms, weight 2.5 each):
    # logistic regression of ID vs outlier on the logsumexp energy of features (outliers through their own DT)
    w_energy_knn: float = 0.0  # weight of the energy regulariser on the k-NN outliers (reference variant 2.5)
    w_energy_lat: float = 0.0  # weight of the energy regulariser on the latent outliers (reference variant 2.5)
    # Beyond the paper (oal/losses.py says why and how), off at 0: a VOS-style term on the energy score EBO reads
    # (logsumexp of logits; outliers through their own projector and the student's own classifier head), and
    # outlier exposure on the latent outliers decoded to pixels (diffusion.mode=pixel, or outliers.pixel_path)
    w_logit_energy_knn: float = 0.0  # logit-energy term on the k-NN outliers (VOS's weight: 0.1)
    w_logit_energy_lat: float = 0.0  # logit-energy term on the latent outliers (VOS's weight: 0.1)
    w_pixel_oe: float = 0.0  # outlier exposure (cross-entropy to uniform) on decoded outliers (OE's weight: 0.5)
    kd_temperature: float = 1.0  # softmax temperature of both KD terms
    club_training: str = "reference"  # reference: q-nets minimise the OAL loss | loglik: q-nets fit log q(y|x)
    outlier_batch_size: int = 128  # outliers drawn per step (capped by the ID batch's size)

    @property
    def uses_teacher(self) -> bool:
        return self.w_logit_kd > 0 or self.w_feat_kd > 0

    @property
    def uses_knn(self) -> bool:
        """A term needs the k-NN outlier embeddings."""
        return self.w_micl_knn > 0 or self.w_energy_knn > 0 or self.w_logit_energy_knn > 0

    @property
    def uses_latent(self) -> bool:
        """A term needs the latent outlier vectors."""
        return self.w_micl_lat > 0 or self.w_energy_lat > 0 or self.w_logit_energy_lat > 0

    @property
    def uses_pixel(self) -> bool:
        """A term needs the latent outliers decoded to images."""
        return self.w_pixel_oe > 0


@dataclass
class OutlierConfig:
    knn_path: str | None = None  # .pt file [N, D] (or [C, M, D]) of k-NN outlier embeddings
    latent_path: str | None = None  # .pt file [N, 64] of latent outlier vectors
    # .pt file of decoded outliers {"images": uint8 [N, 3, H, W]} (the latents stage writes one with
    # diffusion.mode=pixel); square images of any side, resized to data.image_size for training
    pixel_path: str | None = None


@dataclass
class KNNConfig:
    k: int = 300  # K of the K-th nearest-neighbour distance (reference 300)
    select: int = 50  # boundary points per class: those with the largest K-th NN distance
    sigma: float = 0.07  # std of the Gaussian perturbation of boundary points
    rounds: int = 100  # sampling rounds per class
    pic_nums: int = 5  # boundary points perturbed per round
    candidates: int = 1500  # Gaussian candidates per perturbed boundary point
    keep_per_point: int = 2  # farthest candidates kept per perturbed boundary point
    per_class_cap: int = 500  # ID embeddings kept per class (reference 500 for CIFAR-100)
    use_gpu: bool = True  # put faiss indexes on a GPU when faiss-gpu and a GPU are present


@dataclass
class DiffusionConfig:
    # builtin-tiny (untrained, random weights: exercises the machinery) | builtin-ldm (trained on the ID training
    # images by the diffusion stage, see ldm.*) | a local diffusers folder | a hub id
    model: str = "builtin-tiny"
    checkpoint: str | None = None  # builtin-ldm's weights; default <output_dir>/<name>/diffusion/checkpoint.pt
    prompt: str = "A high-quality image of the {}"  # {} is replaced by the class name
    # The norm the k-NN outliers are scaled to, per class, before they are written into the text encoder's input
    # token embedding: token_embedding (the class name's first sub-token's embedding row; what the reference's
    # CIFAR-100 anchor file holds, norms 0.34-0.42) | encoder_mean (the mean over positions of the encoder output
    # for the bare name; the reference's CIFAR-10 anchor file, norms about 27)
    anchor_norm: str = "token_embedding"
    scheduler: str = "ddim"  # ddim | pndm (PLMS, the reference's) | dpm (DPM-Solver++)
    steps: int = 50  # denoising steps (reference 50)
    guidance_scale: float = 7.5  # classifier-free guidance (reference 7.5)
    num_outliers: int = 300  # latent outliers to synthesise (reference 300 per run)
    batch_size: int = 3  # samples per sampler call (reference 3)
    shard_size: int = 30  # outliers per output shard (the unit of resume and of Ray work)
    resolution: int | None = None  # image side in pixels; default: the model's own (512 for SD v1)
    dtype: str = "auto"  # auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16
    # torch.compile the UNet for sampling: off | default | max-autotune (a GPU run: one compile per actor, minutes;
    # pays back over many sampling calls, see bench.gpu_speed)
    compile: str = "off"
    reduction: str = "channel_row_mean"  # latent -> vector: channel_row_mean (reference) | channel_mean | flatten
    mode: str = "latent"  # latent (never decoded) | pixel (also decode: loss.w_pixel_oe, the pixel-space comparison)
    # What conditions each sample: outliers (a k-NN outlier embedding written at the class token: OAL) | class (the
    # plain class prompt, no outlier: an ablation, in-distribution-looking samples)
    conditioning: str = "outliers"
    max_nonfinite_fraction: float = 0.1  # fail if more than this fraction of latents is NaN/inf
    projection_steps: int = 300  # steps to learn the teacher->conditioning projection (widths differ)
    grid_samples: int = 16  # latent outliers decoded into a grid image, for looking only (0: none)


@dataclass
class LDMConfig:
    """The built-in latent diffusion model the diffusion stage trains on the ID images (diffusion.model=builtin-ldm):
    the autoencoder first, then the text-conditioned UNet (oal/ldm.py)."""

    vae_epochs: int = 2  # autoencoder passes over the ID training set
    epochs: int = 10  # UNet passes over the ID training set (after the autoencoder's)
    batch_size: int = 64  # images per step
    vae_lr: float = 2e-3  # AdamW learning rate of the autoencoder
    lr: float = 2e-3  # AdamW learning rate of the UNet and text encoder (after a warm-up of 5% of its steps)
    # constant (after the warm-up) | cosine (decay to 0 over the UNet's steps). Constant: fashion's demo model, 25
    # epochs, reached 83.3% class-conditional accuracy against cosine's 69.3% (same judge; docs/benchmarks.md)
    lr_schedule: str = "constant"
    weight_decay: float = 0.0  # AdamW weight decay of both
    # Min-SNR-gamma weighting of the UNet's loss (5 in its paper); null: plain MSE. On fashion at 15 UNet epochs it
    # did not bring class conditioning sooner: 46.9% class-conditional accuracy against 49.5% (docs/benchmarks.md)
    snr_gamma: float | None = None
    kl_weight: float = 1e-4  # weight of the autoencoder's KL term (per latent element) beside its reconstruction MSE
    cond_dropout: float = 0.1  # share of images trained with the empty prompt (for classifier-free guidance)
    # The text encoder learns with the UNet (latent diffusion's own recipe); false: frozen, as Stable Diffusion's CLIP
    train_text_encoder: bool = True
    eval_samples: int = 32  # samples per class for the class-conditional accuracy (judged by the teacher)
    grid_per_class: int = 8  # samples per class in the decoded grid image (0: none)
    mixed_precision: str = "no"  # no | fp16 | bf16 (fp16 only on GPU)


@dataclass
class EvalConfig:
    postprocessors: list[str] = field(default_factory=lambda: ["ebo", "msp", "mls", "knn"])  # scores to report
    primary: str = "ebo"  # postprocessor whose numbers head the results table
    checkpoint: str = "last"  # which epoch's weights are evaluated: last | best (by ID val accuracy, as OpenOOD)
    baseline: bool = True  # also train the base stage (CE only) and report it as the CE baseline row
    ebo_temperature: float = 1.0  # T in T * logsumexp(logits / T)
    knn_k: int = 10  # K of the KNN feature-space score
    plots: bool = True  # write ROC curves and score histograms as PNG


@dataclass
class ClusterConfig:
    """How the jobs in `jobs/` place the work on Ray (the library itself never reads this)."""

    use_gpu: bool = False  # one GPU per synthesis actor and per training worker
    synth_actors: int = 2  # Ray actors that sample latent outliers (shards handed out as a work queue)
    synth_cpus_per_actor: float = 1.0  # CPUs reserved per synthesis actor (its torch thread count on CPU)
    synth_max_replacements: int = 4  # dead synthesis actors replaced before the job gives up
    num_workers: int = 1  # Ray Train workers (data-parallel ranks) per training stage
    cpus_per_worker: float = 1.0  # CPUs reserved per training worker
    # Ray tasks (each with a training worker's resources) that the embeddings and evaluation stages split their
    # datasets over, and the k-NN stage its classes, merged in order; 0: one per training worker (cluster.num_workers)
    shards: int = 0
    max_failures: int = 2  # Ray Train restarts from the last checkpoint after a worker dies
    checkpoints_to_keep: int = 2  # Ray Train checkpoints kept per training stage
    storage_path: str | None = None  # Ray Train storage (local path or s3://...); default <run dir>/ray
    # The cluster adds nodes on demand (cluster launcher, KubeRay autoscaler): resource checks then use the
    # maximum the autoscaler publishes, and are skipped where it publishes none; false: what is there now.
    autoscaling: bool = False


@dataclass
class SearchConfig:
    """Ray Tune over the OAL loss weights (jobs/tune.py)."""

    weights: list[str] = field(default_factory=lambda: ["w_logit_kd", "w_feat_kd", "w_micl_knn", "w_micl_lat"])  # searched
    range_factor: float = 10.0  # log-uniform in [reference / f, reference * f] for each searched weight
    allow_zero: bool = True  # each weight may also be 0 (an ablation), with probability 1/2
    tune_lr: bool = False  # also search student.lr, log-uniform in [lr_min, lr_max]
    lr_min: float = 0.001  # lower bound of student.lr
    lr_max: float = 0.1  # upper bound of student.lr
    algorithm: str = "random"  # random | grid (reference x {0, 1/f, 1, f}) | optuna (TPE)
    scheduler: str = "fifo"  # fifo (every trial runs all epochs) | asha (early stopping)
    num_samples: int = 8  # trials (for grid: repetitions of the grid)
    max_concurrent: int = 2  # trials at once (each is a Ray Train run of cluster.num_workers workers)
    metric: str = "val/ood_auroc"  # validation OOD AUROC: never a test OOD set
    max_id_acc_drop: float = 0.02  # a trial losing more ID val accuracy than this vs the baseline cannot win
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    reduction_factor: float = 4.0  # ASHA: keep the top 1/factor at each rung (Ray's default)
    retrain_best: bool = False  # retrain the best weights and evaluate on the test OOD sets


@dataclass
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; default: the MLFLOW_TRACKING_URI environment variable
    experiment: str = "oal"  # MLflow experiment name
    system_metrics: bool = True  # CPU / memory / GPU metrics on every stage run
    log_model: bool = True  # log the student with mlflow.pytorch.log_model


@dataclass
class OALConfig:
    name: str = "digits"  # run name; outputs go to <output_dir>/<name>/
    output_dir: str = "runs"  # root of all outputs: a local or mounted path, or s3://bucket/prefix
    seed: int = 0  # seed of weights, data order and outlier draws
    device: str = "auto"  # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, lr=0.05))
    base: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, lr=0.1))  # the CE-only student
    student: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ldm: LDMConfig = field(default_factory=LDMConfig)
    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    @property
    def run_dir(self) -> Path:
        """The run's folder; for an s3:// output_dir, this node's mirror of it (oal.storage)."""
        if "://" in self.output_dir:
            from oal.storage import mirror

            return mirror(self.output_dir) / self.name
        return Path(self.output_dir) / self.name

    @property
    def ray_storage(self) -> str:
        """Ray Train's and Ray Tune's storage: cluster.storage_path, else `<output_dir>/<name>/ray` (in the object
        store too when output_dir is one, so that a resubmitted job on any node resumes from it)."""
        if self.cluster.storage_path:
            return self.cluster.storage_path
        if "://" in self.output_dir:
            return f"{self.output_dir.rstrip('/')}/{self.name}/ray"
        return str((self.run_dir / "ray").resolve())


# Overrides that shrink the digits preset to a smoke run (tests, `bench.quality --quick`): seconds per stage.
QUICK_OVERRIDES = (
    "teacher.epochs=3",
    "base.epochs=2",
    "eval.baseline=false",  # no base stage unless a test asks for the CE baseline row
    "student.epochs=2",
    "knn.k=5",
    "knn.select=5",
    "knn.rounds=2",
    "knn.pic_nums=2",
    "knn.candidates=20",
    "knn.per_class_cap=30",
    "eval.plots=false",
    "diffusion.steps=2",
    "diffusion.num_outliers=12",
    "diffusion.shard_size=6",
    "diffusion.batch_size=6",
    "diffusion.projection_steps=20",
    "diffusion.grid_samples=4",
)


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        path = f"{prefix}{k}"
        if isinstance(v, DictConfig):
            keys.extend(_valid_keys(v, path + "."))
        else:
            keys.append(path)
    return keys


def _check_keys(base: DictConfig, other: Any, source: str, prefix: str = "") -> None:
    """Reject unknown keys with a message naming the key and listing the valid ones."""
    if isinstance(other, DictConfig):
        other = OmegaConf.to_container(other)  # unresolved: a preset's required `???` stays a plain value here
    for k, v in other.items():
        path = f"{prefix}{k}"
        if k not in base:
            siblings = ", ".join(_valid_keys(base, prefix)) if prefix else ", ".join(str(k) for k in base.keys())
            raise ConfigError(f"unknown config key '{path}' (from {source}); valid keys here: {siblings}")
        if isinstance(v, (dict, DictConfig)) and isinstance(base[k], DictConfig):
            _check_keys(base[k], v, source, path + ".")


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        return p
    p = PRESETS_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        names = ", ".join(sorted(x.stem for x in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown preset '{name_or_path}'; shipped presets: {names} (or give a .yaml path)")
    return p


def load_config(preset: str | None = None, overrides: list[str] | None = None) -> OALConfig:
    """Merge defaults, a preset (name or .yaml path) and `key=value` overrides into an `OALConfig`."""
    cfg = OmegaConf.structured(OALConfig)
    layers: list[tuple[str, Any]] = []
    if preset:
        path = preset_path(preset)
        layers.append((str(path), OmegaConf.load(path)))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. student.epochs=3)")
    if overrides:
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    required: set[str] = set()  # a preset's `???` values; OmegaConf's merge skips them, so they are tracked here
    for source, layer in layers:
        _check_keys(cfg, layer, source)
        required = (required - set(_leaf_keys(layer, False))) | set(_leaf_keys(layer, True))
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except ValidationError as e:
            raise ConfigError(f"bad value for '{e.full_key}' (from {source}): {e.msg}") from None
        except (ConfigKeyError, OmegaConfBaseException) as e:
            raise ConfigError(f"config error (from {source}): {e}") from None
    missing = sorted(required)
    if missing:
        where = f"preset '{preset}'" if preset else "the config"
        raise ConfigError(f"{where} needs " + "; ".join(f"'{k}' ({PATH_HINTS.get(k, 'a value')})" for k in missing)
                          + ". Give each on the command line, e.g. " + " ".join(f"{k}=..." for k in missing))
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, OALConfig)
    validate(obj)
    return obj


# What a preset's required value (`???` in its YAML) is, for the error that asks for it.
PATH_HINTS = {
    "data.root": "folder holding torchvision's cifar-10-batches-py/ or cifar-100-python/",
    "data.openood_root": "OpenOOD v1.5 data folder with benchmark_imglist/ and images_classic/ or images_largescale/",
    "model.teacher_pretrained": "ViT-B/16 ImageNet-21k backbone weights file (.safetensors, .pth or .npz-converted .pt)",
    "diffusion.model": "Stable Diffusion v1.4 in diffusers format: a folder with unet/, vae/, text_encoder/, "
                       "tokenizer/, scheduler/",
}


def _leaf_keys(node: DictConfig, missing: bool, prefix: str = "") -> list[str]:
    """Leaf keys a layer leaves `???` (missing=True: a preset's required paths) or gives a value (False)."""
    out: list[str] = []
    for k in node.keys():
        path = f"{prefix}{k!s}"
        if OmegaConf.is_missing(node, k):
            out += [path] if missing else []
        elif isinstance(node[k], DictConfig):
            out.extend(_leaf_keys(node[k], missing, path + "."))
        elif not missing:
            out.append(path)
    return out


_CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "loss.club_training": ("reference", "loglik"),
    "teacher.mixed_precision": ("auto", "no", "fp16", "bf16"),
    "student.mixed_precision": ("auto", "no", "fp16", "bf16"),
    "student.teacher_dtype": ("auto", "fp32", "bf16"),
    "teacher.optimizer": ("sgd", "adam", "adamw"),
    "base.optimizer": ("sgd", "adam", "adamw"),
    "base.mixed_precision": ("auto", "no", "fp16", "bf16"),
    "model.student_init": ("scratch", "base"),
    "eval.checkpoint": ("last", "best"),
    "diffusion.scheduler": ("ddim", "pndm", "dpm"),
    "diffusion.dtype": ("auto", "fp32", "fp16", "bf16"),
    "diffusion.compile": ("off", "default", "max-autotune"),
    "diffusion.reduction": ("channel_row_mean", "channel_mean", "flatten"),
    "diffusion.anchor_norm": ("token_embedding", "encoder_mean"),
    "diffusion.mode": ("latent", "pixel"),
    "diffusion.conditioning": ("outliers", "class"),
    "ldm.mixed_precision": ("no", "fp16", "bf16"),
    "ldm.lr_schedule": ("constant", "cosine"),
    "search.algorithm": ("random", "grid", "optuna"),
    "search.scheduler": ("fifo", "asha"),
    "search.metric": ("val/ood_auroc", "val/id_accuracy"),
    "student.optimizer": ("sgd", "adam", "adamw"),
}


# The loss weights, and the reference's value of each (the energy pair: its energy_rl variant's; the terms beyond the
# paper: their own papers' weights, VOS 0.1 and OE 0.5). Ray Tune searches around these.
REFERENCE_WEIGHTS = {"w_logit_kd": 4.0, "w_feat_kd": 8.0, "w_micl_knn": 0.1, "w_micl_lat": 0.2,
                     "w_energy_knn": 2.5, "w_energy_lat": 2.5, "w_logit_energy_knn": 0.1, "w_logit_energy_lat": 0.1,
                     "w_pixel_oe": 0.5}
LOSS_WEIGHTS = tuple(REFERENCE_WEIGHTS)


def validate(cfg: OALConfig) -> None:
    """Checks that need more than a type: ranges and choices, each naming its key."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(OmegaConf.structured(cfg), key)
        if value not in choices:
            raise ConfigError(f"'{key}' is {value!r}; expected one of {', '.join(choices)}")
    for key in ("data.batch_size", "data.image_size", "teacher.epochs", "base.epochs", "student.epochs", "eval.knn_k",
                "teacher.grad_accum_steps", "student.grad_accum_steps", "loss.outlier_batch_size",
                "diffusion.steps", "diffusion.num_outliers", "diffusion.batch_size", "diffusion.shard_size",
                "cluster.synth_actors", "cluster.num_workers", "search.num_samples", "search.max_concurrent",
                "ldm.batch_size", "ldm.epochs", "ldm.vae_epochs"):
        value = OmegaConf.select(OmegaConf.structured(cfg), key)
        if value < 1:
            raise ConfigError(f"'{key}' is {value}; expected an integer >= 1")
    for key in ("teacher.precise_bn", "base.precise_bn", "student.precise_bn", "cluster.shards"):
        value = OmegaConf.select(OmegaConf.structured(cfg), key)
        if value < 0:
            meaning = "means one per training worker" if key == "cluster.shards" else "turns it off"
            raise ConfigError(f"'{key}' is {value}; expected an integer >= 0 (0 {meaning})")
    for w in LOSS_WEIGHTS:
        if getattr(cfg.loss, w) < 0:
            raise ConfigError(f"'loss.{w}' is {getattr(cfg.loss, w)}; loss weights must be >= 0")
    if cfg.model.teacher_image_size is not None and cfg.model.teacher_image_size < 1:
        raise ConfigError(f"'model.teacher_image_size' is {cfg.model.teacher_image_size}; expected a side >= 1 "
                          f"or null (the student's data.image_size)")
    if cfg.ldm.snr_gamma is not None and not cfg.ldm.snr_gamma > 0:
        raise ConfigError(f"'ldm.snr_gamma' is {cfg.ldm.snr_gamma}; expected a number > 0 (5 in the Min-SNR paper) "
                          f"or null (plain MSE)")
    out = str(cfg.output_dir)
    if "://" in out and (not out.startswith("s3://") or not out[len("s3://"):].strip("/")):
        raise ConfigError(f"'output_dir' is '{out}'; expected a local or mounted path, or s3://bucket[/prefix]")
    for key in PATH_KEYS[1:]:
        value = OmegaConf.select(OmegaConf.structured(cfg), key)
        if value and "://" in str(value):
            raise ConfigError(f"'{key}' is '{value}': it is read as a file path, and object storage URIs are not "
                              "supported for it; expected a local or mounted path (only output_dir may be s3://...)")
    known = LOSS_WEIGHTS
    bad = [w for w in cfg.search.weights if w not in known]
    if bad:
        raise ConfigError(f"'search.weights' names {bad}, which are not loss weights; valid: {', '.join(known)}")
    if not cfg.search.weights and not cfg.search.tune_lr:
        raise ConfigError("'search.weights' is empty and search.tune_lr is false: nothing to search")
    if cfg.search.range_factor <= 1:
        raise ConfigError(f"'search.range_factor' is {cfg.search.range_factor}; expected > 1 (an empty or inverted "
                          f"range otherwise)")
    if not 0 < cfg.search.lr_min < cfg.search.lr_max:
        raise ConfigError(f"'search.lr_min'/'search.lr_max' are {cfg.search.lr_min}/{cfg.search.lr_max}; expected "
                          f"0 < lr_min < lr_max")
    pixel_oe = cfg.loss.w_pixel_oe > 0 or "w_pixel_oe" in cfg.search.weights
    if pixel_oe and cfg.outliers.pixel_path is None and cfg.diffusion.mode != "pixel":
        raise ConfigError("'loss.w_pixel_oe' needs decoded outliers, and diffusion.mode is 'latent' (never decoded): "
                          "set diffusion.mode=pixel (the latents stage then decodes each outlier) or give "
                          "outliers.pixel_path, or set loss.w_pixel_oe=0")
    if "{}" not in cfg.diffusion.prompt:
        raise ConfigError(f"'diffusion.prompt' is {cfg.diffusion.prompt!r}; it must contain {{}} for the class name")
    if cfg.eval.primary not in cfg.eval.postprocessors:
        raise ConfigError(f"'eval.primary' is {cfg.eval.primary!r}; it must be one of eval.postprocessors "
                          f"{cfg.eval.postprocessors}")


# Config keys that name files or folders given by the user (outputs are under output_dir).
PATH_KEYS = ("output_dir", "data.root", "data.openood_root", "model.teacher_pretrained", "model.teacher_checkpoint",
             "model.base_checkpoint", "diffusion.model", "diffusion.checkpoint", "outliers.knn_path",
             "outliers.latent_path", "outliers.pixel_path")


def absolute_paths(cfg: OALConfig, cwd: Path | None = None) -> OALConfig:
    """`cfg` with every relative path of PATH_KEYS made absolute against `cwd` (the driver's working
    directory): Ray workers and actors run elsewhere. A given input that does not exist is a ConfigError now,
    not an error in a remote worker after the stages before it ran. `diffusion.model` counts as a path only when
    it names an existing folder (else it is a built-in name or a hub id)."""
    from oal import storage

    cwd = cwd or Path.cwd()
    d = to_dict(cfg)
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = d
        for k in parents:
            node = node[k]
        value = node[leaf]
        if not value or "://" in str(value):
            continue
        p = Path(str(value)).expanduser()
        path = p if p.is_absolute() else cwd / p
        if key == "diffusion.model":
            if path.is_dir():
                node[leaf] = str(path.resolve())
            continue
        # an s3:// run's file, named by its mirror path (e.g. tune/best.yaml's checkpoints), is looked for in the
        # store only: it is fetched when read (this node may never have had it) and a mirror copy of an object
        # that is gone does not count
        if key != "output_dir" and not (storage.exists(path) if storage.remote(path) else path.exists()):
            raise ConfigError(f"'{key}' is '{value}', which does not exist (looked for {path}); expected an "
                              f"existing {'folder' if key.startswith('data.') else 'file'}")
        node[leaf] = str(path.resolve())
    return from_dict(d)


def from_dict(d: dict) -> OALConfig:
    """Rebuild a config from `to_dict` output (e.g. inside a Ray worker)."""
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OALConfig), d))
    assert isinstance(obj, OALConfig)
    return obj


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out


def fingerprint(*parts: Any) -> str:
    """A short stable hash of config pieces and other inputs (for skip-if-done)."""
    blob = json.dumps([to_dict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
