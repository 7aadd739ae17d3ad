"""The pipeline's stages as plain functions on an `OALConfig` (their order, and how each runs: `oal.registry`),
each reading and writing files under `<output_dir>/<name>/<stage>/`. A stage is complete when its `stage.json`
manifest exists (written last); it is skipped when that manifest's fingerprint matches the fingerprint of its
inputs. With output_dir=s3://..., the same files are written through to the object store and read back from it
(`oal.storage`): the manifest and the outputs' existence are asked of the store, never of a node's mirror.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oal import config as C
from oal import storage
from oal.data import Benchmark, build_benchmark
from oal.epochs import CHECKPOINT, FitResult
from oal.evaluate import (
    accuracy,
    collect,
    eval_sets,
    merge,
    report_from_outputs,
    validation_metrics,
    write_report,
)
from oal.evaluate import shard as data_shard
from oal.losses import OALLoss
from oal.models import Classifier, build_student, build_teacher
from oal.storage import load_torch, save_torch, write_json, write_text
from oal.train import (
    Loop,
    OALTerms,
    fit,
    load_checkpoint_net,
    load_outliers,
    load_pixel_outliers,
    resolve_device,
)

log = logging.getLogger("oal")
MANIFEST = "stage.json"
EpochHook = Callable[[int, dict[str, float], Path], None]


@dataclass
class StageResult:
    name: str
    dir: Path
    fingerprint: str
    skipped: bool
    outputs: dict[str, str]
    report: Any = field(default=None, repr=False, compare=False)  # an evaluation's EvalReport, when it computed one


def stage_dir(cfg: C.OALConfig, stage: str) -> Path:
    return cfg.run_dir / stage


def read_manifest(d: Path) -> dict[str, Any] | None:
    text = storage.read_text(Path(d) / MANIFEST)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def output_of(cfg: C.OALConfig, stage: str, key: str) -> Path:
    """The file a finished upstream stage recorded as its output `key` (in its manifest; this node's path for it):
    how a stage reads another's output, never by that stage's file name."""
    d = stage_dir(cfg, stage)
    m = read_manifest(d)
    if m is None or key not in m.get("outputs", {}):
        raise FileNotFoundError(f"the {stage} stage has not finished: no manifest in '{d}' naming its output {key!r}; "
                                f"run it first (`oal pipeline` runs every stage in order)")
    return storage.local(m["outputs"][key])


def is_done(d: Path, fp: str) -> bool:
    """A stage is done when its manifest's fingerprint matches `fp` and every output it names is whole: present,
    with the size the manifest recorded (a file cut short or replaced since is not done, and the stage runs again)."""
    m = read_manifest(d)
    if m is None or m.get("fingerprint") != fp:
        return False
    sizes = m.get("sizes", {})
    for key, value in m["outputs"].items():
        found = storage.size(storage.local(value))
        if found is None:
            log.warning("stage %s: its output %s '%s' is missing; the stage runs again", m.get("stage"), key, value)
            return False
        if key in sizes and found != sizes[key]:
            log.warning("stage %s: its output %s '%s' has %d bytes where its manifest recorded %d (cut short or "
                        "replaced); the stage runs again", m.get("stage"), key, value, found, sizes[key])
            return False
    return True


def finish_stage(stage: str, d: Path, fp: str, cfg: C.OALConfig, outputs: dict[str, Path], **extra: Any) -> StageResult:
    """Record a computed stage: its config, then its manifest (written last: what `is_done` reads) naming its
    `outputs` (each a file written already) with their sizes and digests, the process that wrote it, and `extra`."""
    write_text(C.to_yaml(cfg), d / "config.yaml")
    outs = {k: str(v) for k, v in outputs.items()}
    # which process computed and recorded it (a Ray pipeline does that in workers, never in the driver)
    written_by = process()
    # what `is_done` checks (a file cut short has another size) and what a reader can verify the bytes against
    sizes = {k: storage.size(v) for k, v in outs.items()}
    digests = {k: storage.sha256(v) for k, v in outs.items()}
    # s3://... for an object-storage output (any node maps it to its own mirror), else the path
    write_json({"stage": stage, "fingerprint": fp, "outputs": {k: storage.uri(v) for k, v in outs.items()},
                "sizes": sizes, "sha256": digests, "written_by": written_by, **extra}, d / MANIFEST)  # last
    return StageResult(stage, d, fp, False, outs)


NODE_ENV = "OAL_NODE_ID"  # set by the jobs in every Ray worker process: the Ray node it runs on


def process() -> dict[str, Any]:
    """This process: where a stage (or a shard of one) was computed (and on Ray, on which node), and the CPU kernels
    PyTorch runs there (`AVX2`, `AVX512`, ...): they round differently, and a table's last digits follow them."""
    node = os.environ.get(NODE_ENV)
    return {"host": socket.gethostname(), "pid": os.getpid(), "cpu": torch.backends.cpu.get_cpu_capability(),
            **({"node": node} if node else {})}


Shard = tuple[int, int]  # (index, count): the index-th of count contiguous slices of each dataset (see oal.evaluate.shard)


def skipped(stage: str, d: Path, fp: str) -> StageResult:
    m = read_manifest(d) or {}
    log.info("stage %s: up to date (fingerprint %s), skipped", stage, fp)
    return StageResult(stage, d, fp, True, {k: str(storage.local(v)) for k, v in m.get("outputs", {}).items()})


def _resume_ok(ckpt: Path, fp: str, force: bool = False) -> bool:
    """Resume only from a whole checkpoint written for the same inputs; otherwise start over. One that does not
    load (cut short by a crash, or not ours) is moved aside, never read again nor lost; with `force` (redo the stage
    from scratch) an existing checkpoint is moved aside too."""
    if not storage.exists(ckpt):
        return False
    if force:
        log.warning("--force: %s moved aside to '%s'; training starts over", ckpt,
                    storage.uri(storage.move_aside(ckpt, "replaced")))
        return False
    try:
        state = load_torch(ckpt, "checkpoint")
    except storage.CorruptFileError as e:
        log.warning("%s; moved aside to '%s', training starts over", e, storage.uri(storage.move_aside(ckpt, "corrupt")))
        return False
    if state.get("meta", {}).get("fingerprint") == fp:
        log.info("resuming from %s (epoch %s)", ckpt, state.get("epoch"))
        return True
    log.warning("checkpoint %s was written for other inputs; starting over", ckpt)
    return False


OWN_DATA = ("folder", "imglist")  # benchmarks read from the user's files


# ---- what a stage's fingerprint reads beside the config (the fingerprints themselves: oal.registry) ----------

def data_id(cfg: C.OALConfig) -> Any:
    """The data section, and for a folder or imglist dataset what its files are (their names and versions)."""
    if cfg.data.benchmark in OWN_DATA:
        from oal.data.folder import content_id

        return [C.inputs_of(cfg, "data"), content_id(cfg.data)]
    return C.inputs_of(cfg, "data")


def trained_diffusion(cfg: C.OALConfig) -> bool:
    from oal.diffusion import BUILTIN_LDM

    return cfg.diffusion.model == BUILTIN_LDM


def diffusion_config(cfg: C.OALConfig) -> C.DiffusionConfig:
    """`cfg.diffusion` with builtin-ldm's checkpoint filled in (the diffusion stage's, unless given)."""
    from dataclasses import replace

    if trained_diffusion(cfg) and cfg.diffusion.checkpoint is None:
        return replace(cfg.diffusion, checkpoint=str((stage_dir(cfg, "diffusion") / CHECKPOINT).resolve()))
    return cfg.diffusion


def needs_diffusion(cfg: C.OALConfig) -> bool:
    """The diffusion stage trains when the outlier stages run with builtin-ldm and no checkpoint is given."""
    return any(outlier_stages(cfg)) and trained_diffusion(cfg) and cfg.diffusion.checkpoint is None


def outlier_stages(cfg: C.OALConfig) -> tuple[bool, bool]:
    """Whether the k-NN stage's and the latents stage's outputs are needed: a term uses them and no file is given
    instead (pixel OE reads the latents stage's decoded images)."""
    L, O = cfg.loss, cfg.outliers
    need_lat = (L.uses_latent and O.latent_path is None) or (L.uses_pixel and O.pixel_path is None)
    return L.uses_knn and O.knn_path is None, need_lat


def with_outlier_files(cfg: C.OALConfig, results: dict[str, StageResult]) -> C.OALConfig:
    """`cfg` with the outlier files the k-NN and latents stages wrote filled in where the config gave none."""
    from dataclasses import replace

    need_knn, need_lat = outlier_stages(cfg)
    O = cfg.outliers
    if need_knn:
        O = replace(O, knn_path=str(results["knn"].outputs["outliers"]))
    if need_lat:
        lat = results["latents"].outputs
        O = replace(O, latent_path=O.latent_path or str(lat["vectors"]),
                    pixel_path=O.pixel_path or (str(lat["images"]) if "images" in lat else None))
    return replace(cfg, outliers=O)


def file_id(path: str | None) -> str | None:
    """A file a stage reads (a checkpoint, an outlier file), as a fingerprint sees it: the fingerprint of the stage
    that wrote it when it lies in a finished stage's folder, else its size and modification time."""
    if path is None:
        return None
    m = read_manifest(Path(path).parent)
    if m is not None:
        return m["fingerprint"]
    p = storage.pull(path)
    return f"{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.exists() else path


# ---- stages ----------------------------------------------------------------------------------------

def _val_fn(cfg: C.OALConfig, bench: Benchmark, device: str) -> Callable:
    return lambda net: validation_metrics(net, bench, cfg.eval, device, cfg.data.eval_batch_size, cfg.data.num_workers)


TRAINING_STAGES = ("teacher", "base", "student", "diffusion")  # the stages that train a network (Stage.runs="training")


def training_config(cfg: C.OALConfig, stage: str) -> C.TrainConfig | C.LDMConfig:
    return cfg.ldm if stage == "diffusion" else {"teacher": cfg.teacher, "base": cfg.base, "student": cfg.student}[stage]


def train_stage(cfg: C.OALConfig, stage: str, fp: str, bench: Benchmark | None = None, out_dir: Path | None = None,
                on_epoch_end: EpochHook | None = None, accelerator: Any = None, progress: bool = True,
                force: bool = False) -> FitResult:
    """Train the teacher (cross-entropy), the base student (cross-entropy: the CE baseline, and the OAL student's
    starting point) or the OAL student (CE + KD from the frozen teacher + MICL against the outlier files,
    starting from the base student's weights with `student.init=base`), or the built-in latent diffusion
    model (diffusion: autoencoder, then UNet, on the ID images; `oal.ldm`) into `out_dir` (default: the
    stage's folder), resuming from a checkpoint there that was written for the same inputs (`force`: from
    scratch, the old checkpoint moved aside). `fp`: the stage's fingerprint (`oal.registry.fingerprint`), which
    a checkpoint records and a resume checks. Used as is by `oal student` and inside each Ray Train worker."""
    if stage not in TRAINING_STAGES:
        raise ValueError(f"stage must be one of {TRAINING_STAGES}; got {stage!r}")
    d = out_dir or stage_dir(cfg, stage)
    # The network and the loss's own nets (projectors, CLUB) are built here, before `fit` seeds its loop: seed
    # them too, or a Ray worker (random seed at start) trains another network than `oal student` does.
    torch.manual_seed(cfg.seed)
    bench = bench or build_benchmark(cfg.data)
    if stage == "diffusion":
        from oal import ldm

        return ldm.fit_ldm(bench.train_plain, bench.class_names, cfg.diffusion.prompt, cfg.data.image_size, cfg.ldm,
                           d, seed=cfg.seed, device=cfg.device, on_epoch_end=on_epoch_end, meta={"fingerprint": fp},
                           resume=_resume_ok(d / CHECKPOINT, fp, force), progress=progress, accelerator=accelerator)
    device = resolve_device(cfg.device)
    loop = Loop(batch_size=cfg.data.batch_size, seed=cfg.seed, device=cfg.device, num_workers=cfg.data.num_workers,
                resume=_resume_ok(d / CHECKPOINT, fp, force), progress=progress, accelerator=accelerator)
    hooks: dict[str, Any] = dict(eval_fn=_val_fn(cfg, bench, device), on_epoch_end=on_epoch_end)
    if stage == "teacher":
        net = build_teacher(cfg.teacher, bench.num_classes, cfg.data.image_size)
        return fit(net, bench.train, cfg.teacher, d, loop, **hooks,
                   meta={"arch": cfg.teacher.network, "num_classes": bench.num_classes, "fingerprint": fp,
                         "input_size": teacher_input_size(cfg)})
    if stage == "base":
        net = build_student(cfg.model.student, bench.num_classes)
        return fit(net, bench.train, cfg.base, d, loop, **hooks,
                   meta={"arch": cfg.model.student, "num_classes": bench.num_classes, "fingerprint": fp})
    L = cfg.loss
    teacher = load_teacher(cfg, bench.num_classes) if L.uses_teacher else None
    knn = load_outliers(cfg.outliers.knn_path, "k-NN outlier") if L.uses_knn else None
    lat = load_outliers(cfg.outliers.latent_path, "latent outlier") if L.uses_latent else None
    pix = None
    if L.uses_pixel:
        if cfg.outliers.pixel_path is None:
            raise ValueError("loss.w_pixel_oe > 0 needs decoded outliers: set diffusion.mode=pixel (the latents stage "
                             "decodes them) or give outliers.pixel_path")
        pix = load_pixel_outliers(cfg.outliers.pixel_path, cfg.data.image_size)
    net = build_student(cfg.model.student, bench.num_classes)
    if cfg.student.init == "base" and not loop.resume:  # a resumed run loads its own checkpoint
        load_base(cfg, net, bench.num_classes)
    loss = OALLoss(L, net.feature_dim, teacher.feature_dim if teacher is not None else None,
                   knn.shape[1] if knn is not None else None, lat.shape[1] if lat is not None else None)
    terms = OALTerms(loss, teacher, knn, lat, pix, bench.norm, L.outlier_batch_size)
    return fit(net, bench.train, cfg.student, d, loop, terms, **hooks,
               meta={"arch": cfg.model.student, "num_classes": bench.num_classes, "fingerprint": fp})


def finish_training(cfg: C.OALConfig, stage: str, fp: str, checkpoint: Path, history: list[dict[str, float]],
                    resumed_from_epoch: int = 0) -> StageResult:
    """Record a trained stage: its checkpoint in the stage folder (copied there if trained elsewhere), config,
    manifest last."""
    import shutil

    d = stage_dir(cfg, stage)
    target = d / CHECKPOINT
    if Path(checkpoint).resolve() != target.resolve():
        from oal.storage import atomic_path

        with atomic_path(target) as tmp:
            shutil.copyfile(checkpoint, tmp)
    if stage == "diffusion":
        return finish_diffusion(cfg, fp, target, history, resumed_from_epoch)
    return finish_stage(stage, d, fp, cfg, {"checkpoint": target}, history=history, resumed_from_epoch=resumed_from_epoch)


def finish_diffusion(cfg: C.OALConfig, fp: str, checkpoint: Path, history: list[dict[str, float]],
                     resumed_from_epoch: int, **extra: Any) -> StageResult:
    """Measure the trained diffusion model before anything uses it: the fine-tuned teacher names the class of
    `ldm.eval_samples` samples of each class's prompt (the class-conditional accuracy), beside the teacher's own
    accuracy on real ID validation images; a decoded grid of `ldm.grid_per_class` samples per class."""
    from dataclasses import replace

    from oal.diffusion import class_conditional_accuracy, load_model

    d = stage_dir(cfg, "diffusion")
    bench = build_benchmark(cfg.data)
    dcfg = replace(cfg.diffusion, checkpoint=str(checkpoint))
    model = load_model(dcfg, resolve_device(cfg.device), cfg.seed)
    teacher = load_teacher(cfg, bench.num_classes)
    n = max(cfg.ldm.eval_samples, cfg.ldm.grid_per_class)
    quality, images = class_conditional_accuracy(model, teacher, bench.class_names, dcfg, n, cfg.seed,
                                                     cfg.data.image_size)
    teacher_real = accuracy(collect(teacher, bench.val, cfg.data.eval_batch_size, resolve_device(cfg.device)))
    quality = {**quality, "samples_per_class": n, "teacher_val_accuracy": teacher_real,
               "teacher_fingerprint": file_id(str(teacher_checkpoint(cfg))), "guidance_scale": dcfg.guidance_scale,
               "steps": dcfg.steps, "scheduler": dcfg.scheduler}
    log.info("diffusion: class-conditional accuracy %.3f (%d samples per class, judged by the teacher, whose accuracy "
             "on real ID validation images is %.3f); per class: %s", quality["accuracy"], n, teacher_real,
             ", ".join(f"{k} {v:.2f}" for k, v in quality["per_class"].items()))
    write_json(quality, d / "quality.json")
    outputs = {"checkpoint": checkpoint, "quality": d / "quality.json"}
    if cfg.ldm.grid_per_class > 0:
        outputs["grid"] = save_grid(images[:, : cfg.ldm.grid_per_class].flatten(0, 1), d / "grid.png",
                                    nrow=cfg.ldm.grid_per_class)
    return finish_stage("diffusion", d, fp, cfg, outputs, history=history, resumed_from_epoch=resumed_from_epoch,
                   metrics={"class_conditional_accuracy": quality["accuracy"], "teacher_val_accuracy": teacher_real},
                   **extra)


def save_grid(images: torch.Tensor, path: Path, nrow: int, min_cell: int = 64) -> Path:
    """Images (N, 3, H, W) in [0, 1] as one PNG, each cell enlarged (nearest) to at least `min_cell` px a side."""
    from torchvision.utils import save_image

    from oal.storage import atomic_path

    side = images.shape[-1]
    if side < min_cell:
        factor = -(-min_cell // side)
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    with atomic_path(path) as tmp:
        save_image(images, tmp, format="png", nrow=nrow, padding=2, pad_value=1.0)
    return path


def adopt_pretrained_diffusion(cfg: C.OALConfig, fp: str, force: bool = False) -> StageResult | None:
    """The diffusion stage from `ldm.pretrained` when its card fits this run: its weights become the stage's
    checkpoint, measured like a trained one (class-conditional accuracy, grid). None when it does not fit (the
    stage then trains; `oal.pretrained.usable` has said why) or is not set. `fp`: the stage's fingerprint."""
    from oal import pretrained

    d = stage_dir(cfg, "diffusion")
    if pretrained.usable(cfg) is None:
        return None
    bench = build_benchmark(cfg.data)
    weights = pretrained.usable(cfg, bench.class_names)
    if weights is None:
        return None
    check_inputs(cfg, "diffusion")
    card = pretrained.read_card(weights.parent / pretrained.CARD)
    target = d / CHECKPOINT
    _resume_ok(target, fp, force)  # with --force the old checkpoint is moved aside, as when training
    pretrained.to_checkpoint(weights, card, fp, target)  # written atomically, as a trained one
    log.info("diffusion: pretrained model %s (sha256 %s, card: %s, %s epochs) used instead of training",
             weights, card["sha256"][:12], card.get("benchmark"), card["training"].get("epochs_done"))
    return finish_diffusion(cfg, fp, target, [], 0, pretrained={"weights": str(weights), "sha256": card["sha256"]})


def compute_training(cfg: C.OALConfig, stage: str, fp: str, bench: Benchmark | None, on_epoch_end: EpochHook | None,
                     accelerator: Any, progress: bool, force: bool) -> StageResult:
    """A training stage (fingerprint `fp`) in this process: trained (resumed when it can be), then recorded. The
    diffusion stage adopts `ldm.pretrained` instead when its card fits."""
    check_inputs(cfg, stage)
    if stage == "diffusion":
        adopted = adopt_pretrained_diffusion(cfg, fp, force)
        if adopted is not None:
            return adopted
    res = train_stage(cfg, stage, fp, bench, None, on_epoch_end, accelerator, progress, force=force)
    return finish_training(cfg, stage, fp, res.checkpoint, res.history, res.resumed_from_epoch)


def check_inputs(cfg: C.OALConfig, stage: str) -> None:
    """Fail before training on what a stage reads only at its end: the diffusion stage is measured by the
    fine-tuned teacher (its class-conditional accuracy)."""
    if stage == "diffusion":
        if not trained_diffusion(cfg):
            raise ValueError(f"the diffusion stage trains the built-in model: set diffusion.model=builtin-ldm (it is "
                             f"{cfg.diffusion.model!r}, which is used as it is)")
        path = teacher_checkpoint(cfg)
        if not storage.exists(path):
            raise FileNotFoundError(f"the diffusion stage is judged by the fine-tuned teacher, and its checkpoint "
                                    f"'{path}' does not exist: run the teacher stage first (`oal teacher`), or give "
                                    f"teacher.checkpoint")


def base_checkpoint(cfg: C.OALConfig) -> Path:
    return Path(cfg.base.checkpoint or stage_dir(cfg, "base") / CHECKPOINT)


def teacher_checkpoint(cfg: C.OALConfig) -> Path:
    return Path(cfg.teacher.checkpoint or stage_dir(cfg, "teacher") / CHECKPOINT)


def load_base(cfg: C.OALConfig, net: Classifier, num_classes: int) -> None:
    """Start the OAL student from the base stage's weights (the epoch `weights` selects)."""
    path = base_checkpoint(cfg)
    if not storage.exists(path):
        raise FileNotFoundError(f"base checkpoint '{path}' does not exist (student.init=base); run the base "
                                f"stage first (`oal base`), give base.checkpoint, or set "
                                f"student.init=scratch")
    state = load_torch(path, "base checkpoint")
    meta = state.get("meta", {})
    arch, classes = meta.get("arch"), meta.get("num_classes")
    if arch != cfg.model.student or classes != num_classes:
        raise ValueError(f"base checkpoint '{path}' (base.checkpoint) holds a {arch} with {classes} classes; "
                         f"expected model.student={cfg.model.student} with {num_classes} classes")
    loaded = load_checkpoint_net(path, net, cfg.weights, state)
    log.info("student starts from the base checkpoint %s (epoch %s, %s)", path, loaded["epoch"], cfg.weights)


def load_teacher(cfg: C.OALConfig, num_classes: int, path: Path | None = None) -> Classifier:
    path = path or teacher_checkpoint(cfg)
    if not storage.exists(path):
        raise FileNotFoundError(f"teacher checkpoint '{path}' does not exist; run `oal teacher` first, or set "
                                f"loss.w_logit_kd=0 loss.w_feat_kd=0 to train without a teacher")
    state = load_torch(path, "teacher checkpoint")
    meta = state.get("meta", {})
    if meta.get("input_size", teacher_input_size(cfg)) != teacher_input_size(cfg):
        raise ValueError(f"teacher checkpoint '{path}' was trained at {meta['input_size']} px; this config builds the "
                         f"teacher at {teacher_input_size(cfg)} px (teacher.image_size)")
    net = build_teacher(cfg.teacher, num_classes, cfg.data.image_size)
    load_checkpoint_net(path, net, cfg.weights, state)  # the reference distils from the teacher's best.ckpt
    return net.eval()


def teacher_input_size(cfg: C.OALConfig) -> int:
    return cfg.teacher.image_size or cfg.data.image_size


def embeddings_shard(cfg: C.OALConfig, bench: Benchmark | None = None, shard: Shard = (0, 1)) -> dict[str, Any]:
    """The teacher's outputs on one slice of the ID training set (a Ray job spreads the slices over workers)."""
    bench = bench or build_benchmark(cfg.data)
    teacher = load_teacher(cfg, bench.num_classes)
    out = collect(teacher, data_shard(bench.train_plain, *shard), cfg.data.eval_batch_size, resolve_device(cfg.device),
                  cfg.data.num_workers)
    return {"outputs": out, "class_names": bench.class_names, "by": process()}


def finish_embeddings(cfg: C.OALConfig, fp: str, parts: list[dict[str, Any]]) -> StageResult:
    """Per-class sample of the shards' features, in shard order; written, then the manifest (fingerprint `fp`,
    the caller's `embeddings_fp`)."""
    from oal.embeddings import per_class_sample

    d = stage_dir(cfg, "embeddings")
    names = parts[0]["class_names"]
    emb = per_class_sample(merge([p["outputs"] for p in parts]), len(names), cfg.embeddings.per_class_cap, cfg.seed)
    save_torch({"embeddings": emb, "class_names": names}, d / "id_embeddings.pt")
    return finish_stage("embeddings", d, fp, cfg, {"embeddings": d / "id_embeddings.pt"}, shape=list(emb.shape),
                   shards=[p["by"] for p in parts])


def compute_anchors(cfg: C.OALConfig, fp: str) -> StageResult:
    """Class anchors from the diffusion model's text encoder, and the teacher -> conditioning projection."""
    from oal.diffusion import class_anchors, fit_projection, load_model, token_embedding_norms

    d = stage_dir(cfg, "anchors")
    emb = load_torch(output_of(cfg, "embeddings", "embeddings"), "ID embeddings")
    model = load_model(diffusion_config(cfg), resolve_device(cfg.device), cfg.seed)
    anchors = class_anchors(model, emb["class_names"], cfg.diffusion.prompt)  # (C, E)
    scales = (token_embedding_norms(model, emb["class_names"]) if cfg.anchors.norm == "token_embedding"
              else anchors.norm(dim=-1))  # (C,): the k-NN outliers' norm
    proj, acc = fit_projection(emb["embeddings"], anchors, cfg.anchors.projection_steps, cfg.seed)
    log.info("anchors: %s; projection %d -> %d, nearest-anchor accuracy %.3f", model.model_id, proj.in_dim,
             proj.out_dim, acc)
    save_torch({"anchors": anchors, "scales": scales, "class_names": emb["class_names"], "projection": proj.state_dict(),
                "in_dim": proj.in_dim, "out_dim": proj.out_dim, "model_id": model.model_id}, d / "anchors.pt")
    return finish_stage("anchors", d, fp, cfg, {"anchors": d / "anchors.pt"}, model_id=model.model_id,
                   projection_accuracy=acc, anchor_norm=cfg.anchors.norm, outlier_norms=scales.tolist())


def knn_shard(cfg: C.OALConfig, shard: Shard = (0, 1)) -> dict[str, Any]:
    """k-NN boundary outlier embeddings [C, M, E], in the conditioning space, at the anchors' scale: those of one
    contiguous block of classes (a Ray job spreads the blocks over workers; each class has its own seeded stream,
    so the blocks equal one process's)."""
    from oal.diffusion import AnchorProjection
    from oal.knn import sample_classes, scale_to_anchors

    emb = load_torch(output_of(cfg, "embeddings", "embeddings"), "ID embeddings")["embeddings"]
    a = load_torch(output_of(cfg, "anchors", "anchors"), "anchors")
    i, n = shard
    classes = range(i * emb.shape[0] // n, (i + 1) * emb.shape[0] // n)
    proj = AnchorProjection(a["in_dim"], a["out_dim"])
    proj.load_state_dict(a["projection"])
    with torch.no_grad():
        projected = proj(emb.float())  # (C, N, E)
    out = scale_to_anchors(sample_classes(projected, cfg.knn, cfg.seed, classes), a["scales"][classes.start:classes.stop])
    return {"outliers": out, "class_names": a["class_names"], "by": process()}


def finish_knn(cfg: C.OALConfig, fp: str, parts: list[dict[str, Any]]) -> StageResult:
    """The blocks in class order; written, then the manifest (fingerprint `fp`)."""
    d = stage_dir(cfg, "knn")
    out = torch.cat([p["outliers"] for p in parts])
    save_torch({"outliers": out, "class_names": parts[0]["class_names"]}, d / "knn_outliers.pt")
    return finish_stage("knn", d, fp, cfg, {"outliers": d / "knn_outliers.pt"}, shape=list(out.shape),
                   shards=[p["by"] for p in parts])


def compute_latents(cfg: C.OALConfig, fp: str, force: bool = False, progress: bool = True) -> StageResult:
    """Latent outliers from the diffusion model conditioned on the k-NN outlier embeddings (never decoded
    for training); a small decoded grid is written for looking only."""
    from oal.synthesize import synthesize

    d = stage_dir(cfg, "latents")
    knn = load_torch(output_of(cfg, "knn", "outliers"), "k-NN outliers")
    manifest = synthesize(diffusion_config(cfg), knn["class_names"], knn["outliers"], d, cfg.seed,
                          resolve_device(cfg.device), fp, progress=progress, redo=force)
    return finish_latents(cfg, manifest)


def finish_latents(cfg: C.OALConfig, manifest: dict[str, Any]) -> StageResult:
    """Record the latents stage once every shard and the synthesis manifest exist (also used by the Ray job)."""
    from oal.synthesize import VECTORS

    d = stage_dir(cfg, "latents")
    outputs: dict[str, Path] = {"vectors": d / VECTORS, "manifest": d / "manifest.json"}
    if manifest.get("images_file"):
        outputs["images"] = d / manifest["images_file"]
    if cfg.diffusion.grid_samples > 0:
        outputs["grid"] = write_grid(cfg, d, d / "grid.png")
    return finish_stage("latents", d, manifest["fingerprint"], cfg, outputs, count=manifest["count"],
                   model_id=manifest["model_id"], vector_shape=manifest["vector_shape"])


def write_grid(cfg: C.OALConfig, shard_dir: Path, path: Path) -> Path:
    """Decode the first `grid_samples` latent outliers into one PNG grid (for looking only)."""
    from oal.diffusion import decode, load_model

    lat = []
    for f in storage.listing(shard_dir, "shard_*.pt"):  # fetched one by one, only as many as the grid shows
        lat.append(load_torch(f, "shard")["latents"])
        if sum(len(x) for x in lat) >= cfg.diffusion.grid_samples:
            break
    model = load_model(diffusion_config(cfg), resolve_device(cfg.device), cfg.seed)
    images = decode(model, torch.cat(lat)[: cfg.diffusion.grid_samples].to(model.device))  # (G, 3, H, W)
    return save_grid(images.float().cpu(), path, nrow=8)


EVAL_DIRS = {"student": "eval", "base": "eval_base"}  # the stage folder of each trained network's evaluation


EvalTarget = tuple[Path, str, Path, str]  # (checkpoint, whose: student or base, output folder, fingerprint)


def eval_checkpoint(cfg: C.OALConfig, of: str) -> Path:
    """The checkpoint the evaluation of `of` (student or base) scores by default."""
    return base_checkpoint(cfg) if of == "base" else stage_dir(cfg, of) / CHECKPOINT


def eval_shard(cfg: C.OALConfig, checkpoint: str, bench: Benchmark | None = None, of: str = "student",
               shard: Shard = (0, 1)) -> dict[str, Any]:
    """The checkpoint's outputs on one slice of each dataset the evaluation needs (`oal.evaluate.eval_sets`)."""
    bench = bench or build_benchmark(cfg.data)
    state = load_torch(checkpoint, f"{of} checkpoint")
    net = build_student(state.get("meta", {}).get("arch", cfg.model.student), bench.num_classes)
    loaded = load_checkpoint_net(Path(checkpoint), net, cfg.weights, state)
    device = resolve_device(cfg.device)
    net = net.to(device).eval()
    outs = {key: collect(net, data_shard(ds, *shard), cfg.data.eval_batch_size, device, cfg.data.num_workers)
            for key, ds in eval_sets(bench, cfg.eval).items()}
    return {"outputs": outs, "benchmark": bench.name, "near": list(bench.near), "far": list(bench.far),
            "epoch": loaded["epoch"], "by": process(), "data": bench.info}


def finish_evaluation(cfg: C.OALConfig, target: EvalTarget, parts: list[dict[str, Any]]) -> StageResult:
    """The report from the shards' outputs (merged in shard order); written, then the manifest. The result
    carries the report (`report`)."""
    ckpt, of, d, fp = target
    name, first = EVAL_DIRS[of], parts[0]
    outs = {key: merge([p["outputs"][key] for p in parts]) for key in first["outputs"]}
    report = report_from_outputs(outs, first["benchmark"], first["near"], first["far"], cfg.eval)
    files = write_report(report, d, cfg.eval.primary, cfg.eval.plots)
    head = report.headline(cfg.eval.primary)  # chosen on validation where the benchmark has validation OOD sets
    log.info("%s: score %s (%s), near / far AUROC %.4f / %.4f", name, head,
             "chosen on validation" if report.chosen else "eval.primary: no validation OOD set",
             report.results[head].near["auroc"], report.results[head].far["auroc"])
    result = finish_stage(name, d, fp, cfg, {"results": d / "results.json", "table": d / "results.md"},
                   checkpoint=str(ckpt), of=of, epoch=first["epoch"], selected=cfg.weights,
                   plots=[str(f) for f in files if f.suffix == ".png"], postprocessor=head,
                   chosen_on_validation=report.chosen is not None, knn_k=report.knn_k,
                   id_accuracy=report.id_accuracy, near_auroc=report.results[head].near["auroc"],
                   far_auroc=report.results[head].far["auroc"], shards=[p["by"] for p in parts],
                     **({"data": first["data"]} if first.get("data") else {}))
    result.report = report
    return result


def evaluated(cfg: C.OALConfig) -> dict[str, Any]:
    """The OAL student's evaluation manifest (the detector packages what it scored), or one error saying to run it."""
    ev = read_manifest(stage_dir(cfg, "eval"))
    if ev is None:
        raise FileNotFoundError(f"the detector packages the evaluated student, and '{stage_dir(cfg, 'eval')}' holds "
                                f"no finished evaluation: run the eval stage first (`oal eval`)")
    return ev


def compute_detector(cfg: C.OALConfig, fp: str, bench: Benchmark | None = None) -> StageResult:
    """Package the evaluated OAL student as a deployable detector (oal/detector.py): the score its evaluation chose
    on validation (with KNN's bank of normalised training features), the threshold that accepts `detector.id_tpr`
    of the ID validation images, the preprocessing and the class names. Records the validation figures it was set
    on and the share each test set gets flagged at that threshold (reported, never used for a choice)."""
    import numpy as np

    from oal.detector import Detector, DetectorSpec, confidence, threshold_at
    from oal.evaluate import KNNScore

    d, ev = stage_dir(cfg, "detector"), evaluated(cfg)
    results = json.loads(storage.pull(storage.local(ev["outputs"]["results"])).read_text())
    score = results.get("chosen") or cfg.eval.primary
    bench = bench or build_benchmark(cfg.data)
    if not bench.ood_val:
        log.warning("detector: %s has no validation OOD set; the score is eval.primary (%s), not a validation "
                    "choice", bench.name, score)
    ckpt = ev["checkpoint"]
    state = load_torch(ckpt, "student checkpoint")
    net = build_student(state.get("meta", {}).get("arch", cfg.model.student), bench.num_classes)
    load_checkpoint_net(Path(ckpt), net, cfg.weights, state)  # the weights the evaluation scored
    device = resolve_device(cfg.device)
    # ID validation always; the training set only for a score that needs it (KNN's bank)
    sets = {**eval_sets(bench, dataclasses.replace(cfg.eval, postprocessors=[score])), "val_id": bench.val}
    outs = {key: collect(net, ds, cfg.data.eval_batch_size, device, cfg.data.num_workers) for key, ds in sets.items()}
    net = net.cpu().eval()
    bank = torch.nn.functional.normalize(outs["train"].features, dim=-1) if score == "knn" else None  # (N, D)
    n = min(8, len(bench.train_plain))  # type: ignore[arg-type]
    first = torch.stack([bench.train_plain[i][0] for i in range(n)])  # (n, 3, S, S)
    grey = bool((first[:, 0] == first[:, 1]).all() and (first[:, 1] == first[:, 2]).all())
    spec = DetectorSpec(arch=state.get("meta", {}).get("arch", cfg.model.student), class_names=bench.class_names,
                        image_size=cfg.data.image_size, grey=grey, mean=list(bench.norm[0]), std=list(bench.norm[1]),
                        score=score, threshold=0.0, id_tpr=cfg.detector.id_tpr,
                        knn_k=results.get("knn_k") if score == "knn" else None,
                        ebo_temperature=cfg.eval.ebo_temperature)
    knn = KNNScore(bank, spec.knn_k) if bank is not None and spec.knn_k else None
    conf = {key: confidence(spec, o, knn).numpy() for key, o in outs.items() if key != "train"}
    spec.threshold = threshold_at(conf["val_id"], spec.id_tpr)
    flagged = {key: float(np.mean(-c > spec.threshold)) for key, c in conf.items()}  # share flagged OOD
    report: dict[str, Any] = {"score": score, "chosen_on_validation": results.get("chosen") is not None, "knn_k": spec.knn_k,
              "threshold": spec.threshold, "id_tpr": spec.id_tpr, "grey": grey,
              "validation": {"id_accepted": 1 - flagged["val_id"],
                             **{f"flagged:{k[8:]}": v for k, v in flagged.items() if k.startswith("val_ood:")}},
              "test": {"id_flagged": flagged["id"], **{f"flagged:{k[4:]}": v for k, v in flagged.items()
                                                       if k.startswith("ood:")},
                       "images": {k: len(c) for k, c in conf.items()}}}
    files = Detector(spec, net, bank).save(d / "model")
    write_json(report, d / "detector_report.json")
    log.info("detector: score %s, threshold %.4g (accepts %.1f%% of ID validation images); test: ID flagged %.1f%%, "
             "%s", score, spec.threshold, 100 * report["validation"]["id_accepted"], 100 * flagged["id"],
             ", ".join(f"{k[4:]} flagged {100 * v:.1f}%" for k, v in flagged.items() if k.startswith("ood:")))
    return finish_stage("detector", d, fp, cfg, {"spec": files[1], "weights": files[0], "report": d / "detector_report.json"},
                   **report, class_names=bench.class_names, checkpoint=str(ckpt))


def write_comparison(cfg: C.OALConfig) -> Path:
    """`<run>/results.md`: the CE baseline (base stage) and the OAL student, each first under the score chosen on
    its validation data, then under every other score."""
    from oal.evaluate import comparison_table

    rows = {}
    names = (("CE (base stage)", "eval_base"),) if cfg.eval.baseline else ()
    for label, name in (*names, ("OAL (student)", "eval")):
        m = read_manifest(stage_dir(cfg, name))
        if m is not None:
            rows[label] = (json.loads(storage.pull(storage.local(m["outputs"]["results"])).read_text()), m)
    path = cfg.run_dir / "results.md"
    write_text(comparison_table(rows, cfg.eval.primary, cfg.data.benchmark), path)
    return path


def check_data(cfg: C.OALConfig) -> None:
    """Before any stage runs: a folder or imglist dataset's layout (from a listing; no image is fetched), and
    whether each class has the training images the k-NN stage needs. One DataError naming what is wrong."""
    if cfg.data.benchmark not in OWN_DATA:
        return
    from oal.data.folder import check_knn, scan

    layout = scan(cfg.data)
    if any(outlier_stages(cfg)):
        check_knn(layout, cfg.knn)


def needs_base(cfg: C.OALConfig) -> bool:
    """The base stage trains when the student starts from it or it is the CE baseline row (`eval.baseline`),
    unless `base.checkpoint` gives a CE-trained student already (that one is then evaluated)."""
    return cfg.base.checkpoint is None and (cfg.student.init == "base" or cfg.eval.baseline)
