"""Typed configuration: dataclass defaults <- YAML preset <- dotted command-line overrides.

Every field carries a docstring-style comment (on its line, or the lines above it), and every numeric field its
accepted range (`num`), every string field with fixed values its choices (`choice`): `validate` checks them at load
and `oal config --help-keys` prints them all.
Library functions take the narrowest piece (e.g. `LossConfig`), never the whole tree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

PRESETS_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration problem, with the offending key named in the message."""


NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")  # a run name: one plain folder name
SEED_MAX = 2**31 - 1  # numpy's, scikit-learn's and torch's seeds all accept [0, 2^31 - 1]


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: bounds (each inclusive or not) and a note on special values."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself excluded (> lo rather than >= lo)
    hi_open: bool = False  # hi itself excluded
    note: str = ""  # what a special value means, e.g. "0 turns it off"

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def __str__(self) -> str:
        lo, hi = ("" if b is None else str(int(b)) if b == int(b) else f"{b:g}" for b in (self.lo, self.hi))
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return "any finite number"


# A field no stage's outputs depend on (`fingerprint` leaves it out): how work is split, what is only looked at, or
# a file given in place of a stage's output (that file's identity is the input then).
NOT_AN_INPUT = {"input": False}


def num(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, note: str = "", inert: bool = False) -> Any:
    """A numeric dataclass field with its accepted range (checked by `validate` at load): `ge`/`gt` the lower bound
    (inclusive / exclusive), `le`/`lt` the upper one. A field typed `X | None` also accepts None. `inert`: no
    stage's outputs depend on it (NOT_AN_INPUT)."""
    rng = Range(lo=gt if gt is not None else ge, hi=lt if lt is not None else le, lo_open=gt is not None,
                hi_open=lt is not None, note=note)
    return field(default=default, metadata={"range": rng, **(NOT_AN_INPUT if inert else {})})


def choice(default: str, *others: str) -> Any:
    """A string dataclass field that accepts one of a fixed set of values (checked by `validate` at load)."""
    return field(default=default, metadata={"choices": (default, *others)})


@dataclass
class DataConfig:
    # registry name: digits | fashion | cifar10 | cifar100 | imagenet200 (built in) | folder | imglist (your own)
    benchmark: str = "digits"
    # dataset folder: for folder, the image tree (train/<class>/, test/<class>/, ood/...; oal/data/folder.py); for
    # imglist, the folder its lists' paths are relative to (both: a local path or s3://bucket/prefix); torchvision's
    # CIFAR layout; for fashion the idx files (flat or FashionMNIST/raw); unused by digits and with openood_root
    root: str | None = None
    # imglist: the folder of its lists (train.txt, test.txt, optional val.txt and classes.txt, ood/{val,near,far}/
    # <set>.txt; lines `<path under data.root> <label>`), local or s3://
    imglist: str | None = None
    # OpenOOD v1.5 data folder (benchmark_imglist/, images_classic/ or images_largescale/): ID train/val/test come
    # from its lists (the leaderboard's split) and the OOD sets too; without it CIFAR comes from data.root
    openood_root: str | None = None
    image_size: int = num(32, ge=1)  # side of the square input the student sees (32 or 224 for CIFAR)
    batch_size: int = num(64, ge=1)  # ID images per step (reference 128)
    eval_batch_size: int = num(256, ge=1)  # images per forward pass during evaluation
    # DataLoader processes of training, validation, embeddings and evaluation (each shard): 0 for the embedded
    # in-memory sets, 4-8 in the image-folder presets. Not persistent across epochs: a resumed run then draws
    # the same augmentation seeds as an uninterrupted one
    num_workers: int = num(0, ge=0)
    split_seed: int = num(0, ge=0, le=SEED_MAX)  # seed of the digits and fashion benchmarks' splits
    train_per_class: int | None = num(None, ge=1)  # cap on ID training images per class (fashion; None: all)
    # An image file of an OpenOOD list that cannot be read: error (stop, naming the file and its list) | skip (left
    # out at load time, where every listed file's header is read once; the count per list is logged)
    on_bad_image: str = choice("error", "skip")
    # folder and imglist: per-channel mean and std that normalise images in [0, 1] (one value for all channels, or
    # three); null: measured on the training images and recorded in the training stages' manifests
    mean: list[float] | None = None
    std: list[float] | None = None  # folder and imglist: see data.mean (null: measured)
    # folder and imglist without ID validation images (no val/ or val.txt): the share of each class's training
    # images drawn (with split_seed) for validation
    val_fraction: float = num(0.1, gt=0, lt=1)


@dataclass
class ModelConfig:
    # The student's network (the base stage trains the same): resnet18_32 | resnet18_224 | resnet_tiny
    student: str = "resnet_tiny"


@dataclass
class TrainConfig:
    epochs: int = num(5, ge=1)  # passes over the ID training set
    # sgd (reference: Nesterov SGD) | adam (reference teacher) | adamw (ViTs from scratch)
    optimizer: str = choice("sgd", "adam", "adamw")
    lr: float = num(0.005, gt=0)  # learning rate of the network being trained (reference 0.005)
    head_lr: float | None = num(None, gt=0)  # learning rate of the classifier head; None: lr (reference teacher: 1e-4)
    momentum: float = num(0.9, ge=0, lt=1)  # SGD momentum
    nesterov: bool = True  # Nesterov momentum
    weight_decay: float = num(5e-4, ge=0)  # L2 penalty on the network's weights
    dt_lr: float = num(0.01, gt=0)  # learning rate of the DT projector (reference 0.01)
    club_lr: float = num(1e-4, gt=0)  # learning rate of the CLUB q-networks (reference 1e-4)
    grad_accum_steps: int = num(1, ge=1)  # optimizer step every N batches
    # auto: bf16 autocast on a GPU that has it (Ampere and later), none on a CPU (the reference trains in fp32: "no")
    mixed_precision: str = choice("auto", "no", "fp16", "bf16")  # auto | no | fp16 | bf16 (fp16 only on GPU)
    # The frozen teacher of the OAL student's training (KD targets): auto is a bf16 copy of its weights (cast once,
    # not per op as autocast casts) where the run's mixed precision is bf16, else fp32 (under fp16: autocast)
    teacher_dtype: str = choice("auto", "fp32", "bf16")  # auto | fp32 | bf16
    channels_last: bool = True  # networks and image batches in channels-last layout on a GPU (a CPU run ignores it)
    checkpoint_every: int = num(1, ge=1)  # save a resumable checkpoint every N epochs
    precise_bn: int = num(2048, ge=0)  # training images that recompute BatchNorm statistics after each epoch (0: off)


@dataclass
class TeacherConfig(TrainConfig):
    """The teacher: its network, then how the teacher stage fine-tunes it (the OAL student distils from it)."""

    network: str = "vit_tiny"  # registry name: vit_b16 | vit_tiny | resnet_tiny
    pretrained: str | None = None  # local weights file for the teacher's backbone (e.g. ViT-B/16 IN-21k)
    # Side of the teacher's input; the student's batch is resized to it (reference: 224 whatever the student's
    # size). None: the student's data.image_size
    image_size: int | None = num(None, ge=1, note="null: the student's data.image_size")
    # A fine-tuned teacher used instead of the teacher stage's (default <output_dir>/<name>/teacher/checkpoint.pt);
    # the stages after it depend on that file, not on this key
    checkpoint: str | None = field(default=None, metadata=NOT_AN_INPUT)


@dataclass
class BaseConfig(TrainConfig):
    """The CE-only student (the CE baseline row, and the OAL student's starting point with student.init=base)."""

    # A CE-trained student used instead of the base stage's (default <output_dir>/<name>/base/checkpoint.pt)
    checkpoint: str | None = field(default=None, metadata=NOT_AN_INPUT)


@dataclass
class StudentConfig(TrainConfig):
    """The OAL student (CE + KD + MICL)."""

    # Its starting weights: scratch (random) | base (the base stage's CE-trained student, as the reference
    # fine-tunes a CE-trained ResNet-18)
    init: str = choice("scratch", "base")


@dataclass
class LossConfig:
    w_logit_kd: float = num(4.0, ge=0)  # weight of KL(teacher logits || student logits) (reference 4)
    w_feat_kd: float = num(8.0, ge=0)  # weight of KL(DT(teacher features) || student features) (reference 8)
    w_micl_knn: float = num(0.1, ge=0)  # weight of CLUB(k-NN outliers -> student features) (reference 0.1)
    w_micl_lat: float = num(0.2, ge=0)  # weight of deep CLUB(latent outliers -> student features) (reference 0.2)
    # The reference's energy_rl variant (its scripts use it instead of the two CLUB terms, weight 2.5 each):
    # logistic regression of ID vs outlier on the logsumexp energy of features (outliers through their own DT)
    w_energy_knn: float = num(0.0, ge=0)  # weight of the energy regulariser on the k-NN outliers (reference variant 2.5)
    w_energy_lat: float = num(0.0, ge=0)  # weight of the energy regulariser on the latent outliers (reference variant 2.5)
    # Beyond the paper (oal/losses.py says why and how), off at 0: a VOS-style term on the energy score EBO reads
    # (logsumexp of logits; outliers through their own projector and the student's own classifier head), and
    # outlier exposure on the latent outliers decoded to pixels (diffusion.mode=pixel, or outliers.pixel_path)
    w_logit_energy_knn: float = num(0.0, ge=0)  # logit-energy term on the k-NN outliers (VOS's weight: 0.1)
    w_logit_energy_lat: float = num(0.0, ge=0)  # logit-energy term on the latent outliers (VOS's weight: 0.1)
    w_pixel_oe: float = num(0.0, ge=0)  # outlier exposure (cross-entropy to uniform) on decoded outliers (OE's weight: 0.5)
    kd_temperature: float = num(1.0, gt=0)  # softmax temperature of both KD terms
    club_training: str = choice("reference", "loglik")  # reference: q-nets minimise the OAL loss | loglik: q-nets fit log q(y|x)
    outlier_batch_size: int = num(128, ge=1)  # outliers drawn per step (capped by the ID batch's size)

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
    k: int = num(300, ge=1)  # K of the K-th nearest-neighbour distance (reference 300)
    select: int = num(50, ge=1)  # boundary points per class: those with the largest K-th NN distance
    sigma: float = num(0.07, gt=0)  # std of the Gaussian perturbation of boundary points
    rounds: int = num(100, ge=1)  # sampling rounds per class
    pic_nums: int = num(5, ge=1)  # boundary points perturbed per round
    candidates: int = num(1500, ge=1)  # Gaussian candidates per perturbed boundary point
    keep_per_point: int = num(2, ge=1)  # farthest candidates kept per perturbed boundary point
    use_gpu: bool = True  # put faiss indexes on a GPU when faiss-gpu and a GPU are present


@dataclass
class EmbeddingsConfig:
    """The teacher's features of the ID training images, the k-NN stage's input."""

    per_class_cap: int = num(500, ge=1)  # ID embeddings kept per class (reference 500 for CIFAR-100)


@dataclass
class AnchorsConfig:
    """Where the k-NN outliers meet the diffusion model: the projection of teacher features into its conditioning."""

    # The norm the k-NN outliers are scaled to, per class, before they are written into the text encoder's input
    # token embedding: token_embedding (the class name's first sub-token's embedding row; what the reference's
    # CIFAR-100 anchor file holds, norms 0.34-0.42) | encoder_mean (the mean over positions of the encoder output
    # for the bare name; the reference's CIFAR-10 anchor file, norms about 27)
    norm: str = choice("token_embedding", "encoder_mean")
    projection_steps: int = num(300, ge=0)  # steps to learn the teacher->conditioning projection (widths differ)


@dataclass
class DiffusionConfig:
    # builtin-tiny (untrained, random weights: exercises the machinery) | builtin-ldm (trained on the ID training
    # images by the diffusion stage, see ldm.*) | a local diffusers folder | a hub id
    model: str = "builtin-tiny"
    # builtin-ldm's weights (default <output_dir>/<name>/diffusion/checkpoint.pt); the stages after it depend on
    # that file, not on this key
    checkpoint: str | None = field(default=None, metadata=NOT_AN_INPUT)
    prompt: str = "A high-quality image of the {}"  # {} is replaced by the class name
    scheduler: str = choice("ddim", "pndm", "dpm")  # ddim | pndm (PLMS, the reference's) | dpm (DPM-Solver++)
    steps: int = num(50, ge=1)  # denoising steps (reference 50)
    guidance_scale: float = num(7.5, ge=0)  # classifier-free guidance (reference 7.5)
    num_outliers: int = num(300, ge=1)  # latent outliers to synthesise (reference 300 per run)
    batch_size: int = num(3, ge=1, inert=True)  # samples per sampler call (reference 3; the samples do not depend on it)
    shard_size: int = num(30, ge=1)  # outliers per output shard (the unit of resume and of Ray work)
    resolution: int | None = num(None, ge=8)  # image side in pixels; default: the model's own (512 for SD v1)
    dtype: str = choice("auto", "fp32", "fp16", "bf16")  # auto (fp16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16
    # torch.compile the UNet for sampling: off | default | max-autotune (a GPU run: one compile per actor, minutes;
    # pays back over many sampling calls, see bench.gpu_speed)
    compile: str = choice("off", "default", "max-autotune")
    # latent -> vector: channel_row_mean (reference) | channel_mean | flatten
    reduction: str = choice("channel_row_mean", "channel_mean", "flatten")
    # latent (never decoded) | pixel (also decode: loss.w_pixel_oe, the pixel-space comparison)
    mode: str = choice("latent", "pixel")
    # What conditions each sample: outliers (a k-NN outlier embedding written at the class token: OAL) | class (the
    # plain class prompt, no outlier: an ablation, in-distribution-looking samples)
    conditioning: str = choice("outliers", "class")
    max_nonfinite_fraction: float = num(0.1, ge=0, le=1)  # fail if more than this fraction of latents is NaN/inf
    grid_samples: int = num(16, ge=0, inert=True)  # latent outliers decoded into a grid image, for looking only (0: none)


@dataclass
class LDMConfig:
    """The built-in latent diffusion model the diffusion stage trains on the ID images (diffusion.model=builtin-ldm):
    the autoencoder first, then the text-conditioned UNet (oal/ldm.py)."""

    vae_epochs: int = num(2, ge=1)  # autoencoder passes over the ID training set
    epochs: int = num(10, ge=1)  # UNet passes over the ID training set (after the autoencoder's)
    batch_size: int = num(64, ge=1)  # images per step
    vae_lr: float = num(2e-3, gt=0)  # AdamW learning rate of the autoencoder
    lr: float = num(2e-3, gt=0)  # AdamW learning rate of the UNet and text encoder (after a warm-up of 5% of its steps)
    # constant (after the warm-up) | cosine (decay to 0 over the UNet's steps). Constant: fashion's demo model, 25
    # epochs, reached 83.3% class-conditional accuracy against cosine's 69.3% (same judge; docs/benchmarks.md)
    lr_schedule: str = choice("constant", "cosine")
    weight_decay: float = num(0.0, ge=0)  # AdamW weight decay of both
    # Min-SNR-gamma weighting of the UNet's loss (5 in its paper); null: plain MSE. On fashion at 15 UNet epochs it
    # did not bring class conditioning sooner: 46.9% class-conditional accuracy against 49.5% (docs/benchmarks.md)
    snr_gamma: float | None = num(None, gt=0, note="5 in the Min-SNR paper; null: plain MSE")
    kl_weight: float = num(1e-4, ge=0)  # weight of the autoencoder's KL term (per latent element) beside its reconstruction MSE
    cond_dropout: float = num(0.1, ge=0, lt=1)  # share of images trained with the empty prompt (for classifier-free guidance)
    # The text encoder learns with the UNet (latent diffusion's own recipe); false: frozen, as Stable Diffusion's CLIP
    train_text_encoder: bool = True
    eval_samples: int = num(32, ge=1)  # samples per class for the class-conditional accuracy (judged by the teacher)
    grid_per_class: int = num(8, ge=0)  # samples per class in the decoded grid image (0: none)
    mixed_precision: str = choice("no", "fp16", "bf16")  # no | fp16 | bf16 (fp16 only on GPU)
    # A pretrained model used instead of training when its model card fits this run (split, classes, image size,
    # prompt, the weights' sha256; any mismatch trains, after one log line saying why): the name of one shipped in
    # oal/weights (fashion-ldm) or a folder with model.safetensors and README.md (oal/pretrained.py). null: train
    pretrained: str | None = None


@dataclass
class DetectorConfig:
    """The deployable detector (oal/detector.py): the evaluated student, the score chosen on validation, a threshold."""

    id_tpr: float = num(0.95, gt=0, lt=1)  # share of ID validation images the threshold accepts (the rest is flagged OOD)


@dataclass
class EvalConfig:
    postprocessors: list[str] = field(default_factory=lambda: ["ebo", "msp", "mls", "knn"])  # scores to report
    # the score reported first when the benchmark has no validation OOD set (otherwise the one with the best
    # validation AUROC leads, and this one is a row like the others)
    primary: str = "ebo"
    baseline: bool = True  # also train the base stage (CE only) and report it as the CE baseline row
    ebo_temperature: float = num(1.0, gt=0)  # T in T * logsumexp(logits / T)
    knn_k: int = num(10, ge=1)  # K of the KNN feature-space score when knn_k_search is empty or there is no validation OOD
    # K values tried on validation (ID validation vs validation OOD AUROC, OpenOOD's convention); [] keeps knn_k
    knn_k_search: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 50, 100, 200, 500, 1000])
    plots: bool = True  # write ROC curves and score histograms as PNG


@dataclass
class ClusterConfig:
    """How the jobs in `jobs/` place the work on Ray (the library itself never reads this)."""

    use_gpu: bool = False  # one GPU per synthesis actor and per training worker
    synth_actors: int = num(2, ge=1)  # Ray actors that sample latent outliers (shards handed out as a work queue)
    synth_cpus_per_actor: float = num(1.0, gt=0)  # CPUs reserved per synthesis actor (its torch thread count on CPU)
    synth_max_replacements: int = num(4, ge=0)  # dead synthesis actors replaced before the job gives up
    num_workers: int = num(1, ge=1)  # Ray Train workers (data-parallel ranks) per training stage
    cpus_per_worker: float = num(1.0, gt=0)  # CPUs reserved per training worker
    # Ray tasks (each with a training worker's resources) that the embeddings and evaluation stages split their
    # datasets over, and the k-NN stage its classes, merged in order; 0: one per training worker (cluster.num_workers)
    shards: int = num(0, ge=0, note="0 means one per training worker")
    # Ray Train restarts from the last checkpoint after a worker dies
    max_failures: int = num(2, ge=-1, note="-1: unlimited, as Ray Train")
    checkpoints_to_keep: int = num(2, ge=1)  # Ray Train checkpoints kept per training stage
    storage_path: str | None = None  # Ray Train storage (local path or s3://...); default <run dir>/ray
    # The cluster adds nodes on demand (cluster launcher, KubeRay autoscaler): resource checks then use the
    # maximum the autoscaler publishes, and are skipped where it publishes none; false: what is there now.
    autoscaling: bool = False
    # Ray node labels (`ray start --labels k=v`) that a node must carry to run the training workers, the sharded
    # stages' tasks and the synthesis actors (Ray's label_selector), e.g. cluster.label_selector.oal-role=work;
    # empty: any node. The job's driver stays where `ray job submit` put it (the head).
    label_selector: dict[str, str] = field(default_factory=dict)


@dataclass
class SearchConfig:
    """Ray Tune over the OAL loss weights (jobs/tune.py)."""

    weights: list[str] = field(default_factory=lambda: ["w_logit_kd", "w_feat_kd", "w_micl_knn", "w_micl_lat"])  # searched
    range_factor: float = num(10.0, gt=1)  # log-uniform in [reference / f, reference * f] for each searched weight
    allow_zero: bool = True  # each weight may also be 0 (an ablation), with probability 1/2
    tune_lr: bool = False  # also search student.lr, log-uniform in [lr_min, lr_max]
    lr_min: float = num(0.001, gt=0)  # lower bound of student.lr
    lr_max: float = num(0.1, gt=0)  # upper bound of student.lr
    algorithm: str = choice("random", "grid", "optuna")  # random | grid (reference x {0, 1/f, 1, f}) | optuna (TPE)
    scheduler: str = choice("fifo", "asha")  # fifo (every trial runs all epochs) | asha (early stopping)
    num_samples: int = num(8, ge=1)  # trials (for grid: repetitions of the grid)
    max_concurrent: int = num(2, ge=1)  # trials at once (each is a Ray Train run of cluster.num_workers workers)
    metric: str = choice("val/ood_auroc", "val/id_accuracy")  # validation OOD AUROC: never a test OOD set
    max_id_acc_drop: float = num(0.02, ge=0, le=1)  # a trial losing more ID val accuracy than this vs the baseline cannot win
    grace_period: int = num(1, ge=1)  # ASHA: epochs before a trial can be stopped
    reduction_factor: float = num(4.0, gt=1)  # ASHA: keep the top 1/factor at each rung (Ray's default)
    retrain_best: bool = False  # retrain the best weights and evaluate on the test OOD sets


@dataclass
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; default: the MLFLOW_TRACKING_URI environment variable
    experiment: str = "oal"  # MLflow experiment name
    system_metrics: bool = True  # CPU / memory / GPU metrics on every stage run
    log_model: bool = True  # log the student with mlflow.pytorch.log_model, and the detector as a registered model
    registered_model: str | None = None  # the detector's name in the Model Registry; default oal-<name>


@dataclass
class OALConfig:
    name: str = "digits"  # run name; outputs go to <output_dir>/<name>/
    output_dir: str = "runs"  # root of all outputs: a local or mounted path, or s3://bucket/prefix
    seed: int = num(0, ge=0, le=SEED_MAX)  # seed of weights, data order and outlier draws
    device: str = choice("auto", "cpu", "cuda")  # auto | cpu | cuda
    # Which epoch's weights a trained network passes on: last | best (by ID validation accuracy, as OpenOOD): the
    # teacher's for the embeddings and the KD targets, the base student's for student.init=base, the evaluated ones
    weights: str = choice("last", "best")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(epochs=5, lr=0.05))
    base: BaseConfig = field(default_factory=lambda: BaseConfig(epochs=5, lr=0.1))
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    anchors: AnchorsConfig = field(default_factory=AnchorsConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ldm: LDMConfig = field(default_factory=LDMConfig)
    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
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
    "embeddings.per_class_cap=30",
    "eval.plots=false",
    "diffusion.steps=2",
    "diffusion.num_outliers=12",
    "diffusion.shard_size=6",
    "diffusion.batch_size=6",
    "anchors.projection_steps=20",
    "diffusion.grid_samples=4",
)


def _is_section(node: Any) -> bool:
    """A config section (a dataclass), not a free map such as cluster.label_selector, whose keys are the user's."""
    return isinstance(node, DictConfig) and OmegaConf.get_type(node) is not dict


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        path = f"{prefix}{k}"
        if _is_section(v):
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
            if path in RENAMED:
                raise ConfigError(f"'{path}' (from {source}) is now '{RENAMED[path]}': give {RENAMED[path]}=... "
                                  f"instead (docs/architecture.md lists the renamed keys)")
            siblings = ", ".join(_valid_keys(base, prefix)) if prefix else ", ".join(str(k) for k in base.keys())
            raise ConfigError(f"unknown config key '{path}' (from {source}); valid keys here: {siblings}")
        if not _is_section(base[k]):
            if isinstance(base[k], DictConfig) and not isinstance(v, (dict, DictConfig)):
                raise ConfigError(f"'{path}' is {v!r} (from {source}); it is a map: give its entries, e.g. "
                                  f"{path}.<key>=<value>, or {path}={{}} for none")
            continue
        if not isinstance(v, (dict, DictConfig)):
            first = next(iter(base[k].keys()))
            raise ConfigError(f"'{path}' is {v!r} (from {source}); it is a section, not a value: give its keys, "
                              f"e.g. {path}.{first}=... (its keys: {', '.join(_valid_keys(base[k], path + '.'))})")
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
    """Merge defaults, a preset (name or .yaml path) and `key=value` overrides into an `OALConfig`, then check every
    value against its field's type and range (`validate`). Any problem is a one-line ConfigError naming the key."""
    cfg = OmegaConf.structured(OALConfig)
    layers: list[tuple[str, Any]] = _preset_layers(preset, []) if preset else []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. student.epochs=3)")
        try:
            OmegaConf.from_dotlist([item])
        except Exception as e:  # the value is parsed as YAML
            raise ConfigError(f"override '{item}' cannot be parsed: {getattr(e, 'problem', None) or _first_line(e)}"
                              ) from None
    if overrides:
        layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    required: set[str] = set()  # a preset's `???` values; OmegaConf's merge skips them, so they are tracked here
    for source, layer in layers:
        _check_keys(cfg, layer, source)
        required = (required - set(_leaf_keys(layer, False))) | set(_leaf_keys(layer, True))
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except ValidationError as e:
            raise ConfigError(_type_error(str(e.full_key or ""), layer, source, e)) from None
        except (ConfigKeyError, OmegaConfBaseException) as e:
            raise ConfigError(f"config error (from {source}): {_first_line(e)}") from None
    missing = sorted(required)
    if missing:
        where = f"preset '{preset}'" if preset else "the config"
        raise ConfigError(f"{where} needs " + "; ".join(f"'{k}' ({PATH_HINTS.get(k, 'a value')})" for k in missing)
                          + ". Give each on the command line, e.g. " + " ".join(f"{k}=..." for k in missing))
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, OALConfig)
    validate(obj)
    return obj


def _preset_layers(preset: str, chain: list[str]) -> list[tuple[str, Any]]:
    """A preset's layers, the presets it `extends:` first (a name or a .yaml path; a preset holds only what differs
    from the one it extends)."""
    path = preset_path(preset)
    if str(path.resolve()) in chain:
        raise ConfigError(f"config file '{path}' extends itself through {' -> '.join(chain)}; expected a chain of "
                          f"presets that ends")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # YAML syntax: the parser's first line says where
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: "
                          f"{getattr(e, 'problem', None) or _first_line(e)}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file '{path}' holds a list; expected a mapping of keys (e.g. `student:` "
                          f"then `  epochs: 3`)")
    parent = loaded.pop("extends", None)
    if parent is None:
        return [(str(path), loaded)]
    if not isinstance(parent, str):
        raise ConfigError(f"config file '{path}': 'extends' is {parent!r}; expected the name of a preset or a .yaml "
                          f"path")
    try:
        below = _preset_layers(parent, [*chain, str(path.resolve())])
    except ConfigError as e:
        raise ConfigError(f"config file '{path}' extends '{parent}': {e}") from None
    return [*below, (str(path), loaded)]


def _first_line(e: BaseException) -> str:
    """An exception's message without OmegaConf's or a parser's context lines."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "list[str]": "a list of strings"}


def _type_error(key: str, layer: Any, source: str, e: Exception) -> str:
    """One line for a value of the wrong type: the key, the value given, what the field accepts."""
    f = KEY_FIELDS.get(key)
    if f is None:
        return f"bad value for '{key}' (from {source}): {_first_line(e)}"
    try:
        given = OmegaConf.select(layer, key)
        given = OmegaConf.to_container(given) if isinstance(given, DictConfig | ListConfig) else given
    except OmegaConfBaseException:
        given = "?"
    base = str(f.type).replace(" | None", "")
    expected = allowed(f) or _TYPE_WORDS.get(base, base) + (" or null" if "None" in str(f.type) else "")
    return f"'{key}' is {given!r} (from {source}); expected {expected}"


# What a preset's required value (`???` in its YAML) is, for the error that asks for it.
PATH_HINTS = {
    "data.root": "the folder preset: the image tree (train/<class>/, test/<class>/, ood/val|near|far/<set>/), "
                 "local or s3://; the CIFAR presets: the folder holding torchvision's cifar-10-batches-py/ or "
                 "cifar-100-python/",
    "data.openood_root": "OpenOOD v1.5 data folder with benchmark_imglist/ and images_classic/ or images_largescale/",
    "teacher.pretrained": "ViT-B/16 ImageNet-21k backbone weights file (.safetensors, .pth or .npz-converted .pt)",
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




# The loss weights, and the reference's value of each (the energy pair: its energy_rl variant's; the terms beyond the
# paper: their own papers' weights, VOS 0.1 and OE 0.5). Ray Tune searches around these.
REFERENCE_WEIGHTS = {"w_logit_kd": 4.0, "w_feat_kd": 8.0, "w_micl_knn": 0.1, "w_micl_lat": 0.2,
                     "w_energy_knn": 2.5, "w_energy_lat": 2.5, "w_logit_energy_knn": 0.1, "w_logit_energy_lat": 0.1,
                     "w_pixel_oe": 0.5}
LOSS_WEIGHTS = tuple(REFERENCE_WEIGHTS)


def fields(node: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """Every leaf field of a config class or instance, as (dotted key, field, value; for a class, the default)."""
    for f in dataclasses.fields(node):
        if not isinstance(node, type):
            value = getattr(node, f.name)
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = f.default
        if dataclasses.is_dataclass(value):
            yield from fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


KEY_FIELDS = {key: f for key, f, _ in fields(OALConfig)}  # every leaf key -> its dataclass field


def _owner(f: dataclasses.Field, node: Any = OALConfig) -> type:
    """The config dataclass that declares field `f` (found by walking the tree from OALConfig)."""
    for g in dataclasses.fields(node):
        if g is f:
            return node
        sub = g.default_factory() if g.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            try:
                return _owner(f, type(sub))
            except LookupError:
                pass
    raise LookupError(f.name)


def allowed(f: dataclasses.Field) -> str:
    """The values a field accepts, in words ('' when its type says it all)."""
    if "choices" in f.metadata:
        return "one of " + ", ".join(f.metadata["choices"])
    rng: Range | None = f.metadata.get("range")
    if rng is None:
        return ""
    kind = "an integer" if str(f.type).startswith("int") else "a number"
    return f"{kind} {rng}" + (" or null" if "None" in str(f.type) else "") + (f" ({rng.note})" if rng.note else "")


def validate(cfg: OALConfig) -> None:
    """Checks that need more than a type, each naming its key: every field's declared range or choices (`num`,
    `choice`), then the checks that involve several fields."""
    for key, f, value in fields(cfg):
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"'{key}' is {value!r}; expected {allowed(f)}")
        rng = f.metadata.get("range")
        if rng is not None and value is not None and value not in rng:
            raise ConfigError(f"'{key}' is {value!r}; expected {allowed(f)}")
    if not NAME_RE.fullmatch(cfg.name) or cfg.name in (".", ".."):
        raise ConfigError(f"'name' is {cfg.name!r}; expected a plain name (letters, digits, '-', '_', '.'; no '/', "
                          f"not '.' or '..'): the run folder is <output_dir>/<name>")
    for stage in ("teacher", "base", "student"):
        t: TrainConfig = getattr(cfg, stage)
        if t.optimizer == "sgd" and t.nesterov and t.momentum == 0:
            raise ConfigError(f"'{stage}.momentum' is 0 with {stage}.nesterov=true; Nesterov SGD needs a momentum "
                              f"> 0 (or set {stage}.nesterov=false)")
    k, cap = cfg.knn, cfg.embeddings.per_class_cap
    for a, b, ok in (("k", "embeddings.per_class_cap", k.k < cap),
                     ("select", "embeddings.per_class_cap", k.select <= cap),
                     ("pic_nums", "knn.select", k.pic_nums <= k.select),
                     ("keep_per_point", "knn.candidates", k.keep_per_point <= k.candidates)):
        if not ok:
            rel = "smaller than" if a == "k" else "at most"
            other = cap if b.startswith("embeddings") else getattr(k, b.split(".")[1])
            raise ConfigError(f"'knn.{a}' is {getattr(k, a)}; expected {rel} {b} ({other})")
    out = str(cfg.output_dir)
    if "://" in out and (not out.startswith("s3://") or not out[len("s3://"):].strip("/")):
        raise ConfigError(f"'output_dir' is '{out}'; expected a local or mounted path, or s3://bucket[/prefix]")
    values = {key: value for key, _, value in fields(cfg)}
    own_data = cfg.data.benchmark in ("folder", "imglist")
    for key in PATH_KEYS[1:]:
        value = values[key]
        if own_data and key in ("data.root", "data.imglist") and str(value).startswith("s3://"):
            continue  # a folder or imglist dataset may live in the store: its files are fetched by the readers
        if value and "://" in str(value):
            raise ConfigError(f"'{key}' is '{value}': it is read as a file path, and object storage URIs are not "
                              "supported for it; expected a local or mounted path (only output_dir, and data.root and "
                              "data.imglist of a folder or imglist dataset, may be s3://...)")
    d = cfg.data
    for key in ("mean", "std"):
        v = getattr(d, key)
        if v is not None and (len(v) not in (1, 3) or (key == "std" and min(v) <= 0)):
            raise ConfigError(f"'data.{key}' is {list(v)}; expected one value for every channel or three (R, G, B)"
                              f"{', each > 0' if key == 'std' else ''}, or null to measure it on the training images")
    if own_data:
        need = ("root", "imglist") if d.benchmark == "imglist" else ("root",)
        for key in need:
            if getattr(d, key) in (None, ""):
                raise ConfigError(f"'data.{key}' is not set; data.benchmark={d.benchmark} reads "
                                  + ("its images from data.root (a folder or s3:// prefix: train/<class>/, "
                                     "test/<class>/, ood/val|near|far/<set>/)" if d.benchmark == "folder" else
                                     "its lists from data.imglist and their images from under data.root"))
    known = LOSS_WEIGHTS
    bad = [w for w in cfg.search.weights if w not in known]
    if bad:
        raise ConfigError(f"'search.weights' names {bad}, which are not loss weights; valid: {', '.join(known)}")
    if not cfg.search.weights and not cfg.search.tune_lr:
        raise ConfigError("'search.weights' is empty and search.tune_lr is false: nothing to search")
    if not cfg.search.lr_min < cfg.search.lr_max:
        raise ConfigError(f"'search.lr_min'/'search.lr_max' are {cfg.search.lr_min}/{cfg.search.lr_max}; expected "
                          f"0 < lr_min < lr_max")
    pixel_oe = cfg.loss.w_pixel_oe > 0 or "w_pixel_oe" in cfg.search.weights
    if pixel_oe and cfg.outliers.pixel_path is None and cfg.diffusion.mode != "pixel":
        raise ConfigError("'loss.w_pixel_oe' needs decoded outliers, and diffusion.mode is 'latent' (never decoded): "
                          "set diffusion.mode=pixel (the latents stage then decodes each outlier) or give "
                          "outliers.pixel_path, or set loss.w_pixel_oe=0")
    if "{}" not in cfg.diffusion.prompt:
        raise ConfigError(f"'diffusion.prompt' is {cfg.diffusion.prompt!r}; it must contain {{}} for the class name")
    if any(k < 1 for k in cfg.eval.knn_k_search):
        raise ConfigError(f"'eval.knn_k_search' is {cfg.eval.knn_k_search}; every K must be >= 1")
    if cfg.eval.primary not in cfg.eval.postprocessors:
        raise ConfigError(f"'eval.primary' is {cfg.eval.primary!r}; it must be one of eval.postprocessors "
                          f"{cfg.eval.postprocessors}")


# Config keys that name files or folders given by the user (outputs are under output_dir).
PATH_KEYS = ("output_dir", "data.root", "data.imglist", "data.openood_root", "teacher.pretrained",
             "teacher.checkpoint", "base.checkpoint", "diffusion.model", "diffusion.checkpoint", "outliers.knn_path",
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


def field_hints() -> dict[str, str]:
    """Each config dataclass field's comment in this file (the block on the lines above it, then the one at its
    end), by "Class.field": the one source of every key's documentation."""
    import ast
    import io
    import tokenize

    src = Path(__file__).read_text()
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, whether the comment stands on a line of its own)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), not tok.line[: tok.start[1]].strip())
    hints = {}
    for node in ast.parse(src).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for st in node.body:
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                above: list[str] = []
                ln = st.lineno - 1
                while ln in comments and comments[ln][1]:
                    above.insert(0, comments[ln][0])
                    ln -= 1
                end = comments.get(st.end_lineno or st.lineno)
                hints[f"{node.name}.{st.target.id}"] = "; ".join(
                    x for x in (" ".join(above), end[0] if end and not end[1] else "") if x)
    return hints


def help_keys() -> str:
    """Every config key: its type, default, accepted values and the comment on its field (`oal config --help-keys`)."""
    hints = field_hints()
    lines = ["Every config key (give as key=value after the command, or in a preset's YAML): type, default, accepted "
             "values, meaning."]
    section = None
    for key, f, default in fields(OALConfig):
        top = key.split(".")[0] if "." in key else ""
        if top != section:
            section = top
            cls = type(getattr(OALConfig(), top)) if top else OALConfig
            doc = (cls.__doc__ or "").strip()
            doc = "" if doc.startswith(cls.__name__ + "(") else " ".join(doc.split())
            lines += ["", f"[{top or 'top level'}]" + (f" {doc}" if doc else "")]
        rule = "; ".join(x for x in (allowed(f), "" if f.metadata.get("input", True) else "not in fingerprints") if x)
        hint = next((hints[f"{c.__name__}.{f.name}"] for c in _owner(f).__mro__ if f"{c.__name__}.{f.name}" in hints), "")
        lines.append(f"  {key} ({f.type}; default {json.dumps(default)}" + (f"; {rule}" if rule else "") + ")"
                     + (f": {hint}" if hint else ""))
    return "\n".join(lines)


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


def inputs_of(cfg: OALConfig, key: str) -> Any:
    """What a stage that reads `key` (a section, a top-level key, or one `section.key`) depends on: the values, less
    the fields declared NOT_AN_INPUT."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    if not dataclasses.is_dataclass(node):
        return node
    return {k: v for k, f, v in fields(node) if f.metadata.get("input", True)}


def fingerprint(*parts: Any) -> str:
    """A short stable hash of config pieces and other inputs (for skip-if-done)."""
    blob = json.dumps([to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Keys that were renamed: the old one is an error naming the new one.
RENAMED = {"model.teacher": "teacher.network", "model.teacher_pretrained": "teacher.pretrained",
           "model.teacher_image_size": "teacher.image_size", "model.teacher_checkpoint": "teacher.checkpoint",
           "model.student_init": "student.init", "model.base_checkpoint": "base.checkpoint",
           "eval.checkpoint": "weights", "knn.per_class_cap": "embeddings.per_class_cap",
           "diffusion.anchor_norm": "anchors.norm", "diffusion.projection_steps": "anchors.projection_steps"}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
