"""The pipeline's stages as plain functions on an `OALConfig`, each reading and writing files under
`<output_dir>/<name>/<stage>/`. A stage is complete when its `stage.json` manifest exists (written
last); it is skipped when that manifest's fingerprint matches the fingerprint of its inputs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from oal import config as C
from oal.data import Benchmark, build_benchmark
from oal.evaluate import EvalReport, evaluate, validation_metrics, write_report
from oal.losses import OALLoss
from oal.models import build_student, build_teacher
from oal.storage import load_torch, save_torch, write_json, write_text
from oal.train import CHECKPOINT, fit, load_checkpoint_net, load_outliers, resolve_device

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


def stage_dir(cfg: C.OALConfig, stage: str) -> Path:
    return cfg.run_dir / stage


def read_manifest(d: Path) -> Optional[dict[str, Any]]:
    p = d / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def is_done(d: Path, fp: str) -> bool:
    m = read_manifest(d)
    return m is not None and m.get("fingerprint") == fp and all(Path(v).exists() for v in m["outputs"].values())


def _finish(stage: str, d: Path, fp: str, cfg: C.OALConfig, outputs: dict[str, Path], **extra: Any) -> StageResult:
    write_text(C.to_yaml(cfg), d / "config.yaml")
    outs = {k: str(v) for k, v in outputs.items()}
    write_json({"stage": stage, "fingerprint": fp, "outputs": outs, **extra}, d / MANIFEST)  # last
    return StageResult(stage, d, fp, False, outs)


def _skipped(stage: str, d: Path, fp: str) -> StageResult:
    m = read_manifest(d) or {}
    log.info("stage %s: up to date (fingerprint %s), skipped", stage, fp)
    return StageResult(stage, d, fp, True, m.get("outputs", {}))


def _resume_ok(ckpt: Path, fp: str) -> bool:
    """Resume only from a checkpoint written for the same inputs; otherwise start over."""
    if not ckpt.exists():
        return False
    meta = load_torch(ckpt, "checkpoint").get("meta", {})
    if meta.get("fingerprint") == fp:
        log.info("resuming from %s (epoch %s)", ckpt, load_torch(ckpt, "checkpoint").get("epoch"))
        return True
    log.warning("checkpoint %s was written for other inputs; starting over", ckpt)
    return False


# ---- fingerprints: what each stage's output depends on ---------------------------------------------

def teacher_fp(cfg: C.OALConfig) -> str:
    return C.fingerprint("teacher", cfg.data, cfg.model.teacher, cfg.model.teacher_pretrained, cfg.teacher, cfg.seed)


def embeddings_fp(cfg: C.OALConfig) -> str:
    return C.fingerprint("embeddings", teacher_fp(cfg), cfg.knn.per_class_cap)


def knn_fp(cfg: C.OALConfig) -> str:
    return C.fingerprint("knn", embeddings_fp(cfg), cfg.knn, cfg.seed)


def student_fp(cfg: C.OALConfig) -> str:
    uses_teacher = cfg.loss.w_logit_kd > 0 or cfg.loss.w_feat_kd > 0
    return C.fingerprint("student", cfg.data, cfg.model.student, cfg.student, cfg.loss, cfg.seed,
                         teacher_fp(cfg) if uses_teacher else None,
                         _file_id(cfg.outliers.knn_path) if cfg.loss.w_micl_knn > 0 else None,
                         _file_id(cfg.outliers.latent_path) if cfg.loss.w_micl_lat > 0 else None)


def _file_id(path: Optional[str]) -> Optional[str]:
    """An outlier file is identified by its producing stage's fingerprint when it has one, else its bytes."""
    if path is None:
        return None
    m = read_manifest(Path(path).parent)
    if m is not None:
        return m["fingerprint"]
    p = Path(path)
    return f"{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.exists() else path


# ---- stages ----------------------------------------------------------------------------------------

def _val_fn(cfg: C.OALConfig, bench: Benchmark, device: str) -> Callable:
    return lambda net: validation_metrics(net, bench, cfg.eval, device, cfg.data.eval_batch_size)


def run_teacher(cfg: C.OALConfig, bench: Optional[Benchmark] = None, on_epoch_end: Optional[EpochHook] = None,
                accelerator: Any = None, progress: bool = True, force: bool = False) -> StageResult:
    """Fine-tune the teacher on the ID training set with cross-entropy."""
    d, fp = stage_dir(cfg, "teacher"), teacher_fp(cfg)
    if not force and is_done(d, fp):
        return _skipped("teacher", d, fp)
    bench = bench or build_benchmark(cfg.data)
    device = resolve_device(cfg.device)
    net = build_teacher(cfg.model, bench.num_classes, cfg.data.image_size)
    res = fit(net, bench.train, cfg.teacher, d, batch_size=cfg.data.batch_size, seed=cfg.seed, device=cfg.device,
              eval_fn=_val_fn(cfg, bench, device), on_epoch_end=on_epoch_end, progress=progress,
              meta={"arch": cfg.model.teacher, "num_classes": bench.num_classes, "fingerprint": fp},
              resume=_resume_ok(d / CHECKPOINT, fp), num_workers=cfg.data.num_workers, accelerator=accelerator)
    return _finish("teacher", d, fp, cfg, {"checkpoint": res.checkpoint},
                   history=res.history, resumed_from_epoch=res.resumed_from_epoch)


def load_teacher(cfg: C.OALConfig, num_classes: int, path: Optional[Path] = None) -> torch.nn.Module:
    path = path or stage_dir(cfg, "teacher") / CHECKPOINT
    if not Path(path).exists():
        raise FileNotFoundError(f"teacher checkpoint '{path}' does not exist; run `oal teacher` first, or set "
                                f"loss.w_logit_kd=0 loss.w_feat_kd=0 to train without a teacher")
    net = build_teacher(cfg.model, num_classes, cfg.data.image_size)
    load_checkpoint_net(path, net)
    return net.eval()


def run_embeddings(cfg: C.OALConfig, bench: Optional[Benchmark] = None, force: bool = False) -> StageResult:
    """The teacher's penultimate features on the ID training set: [C, N, D]."""
    from oal.embeddings import class_embeddings

    d, fp = stage_dir(cfg, "embeddings"), embeddings_fp(cfg)
    if not force and is_done(d, fp):
        return _skipped("embeddings", d, fp)
    bench = bench or build_benchmark(cfg.data)
    teacher = load_teacher(cfg, bench.num_classes)
    emb = class_embeddings(teacher, bench.train_plain, bench.num_classes, cfg.knn.per_class_cap,
                           resolve_device(cfg.device), cfg.data.eval_batch_size, cfg.seed)
    save_torch({"embeddings": emb, "class_names": bench.class_names}, d / "id_embeddings.pt")
    return _finish("embeddings", d, fp, cfg, {"embeddings": d / "id_embeddings.pt"}, shape=list(emb.shape))


def run_knn(cfg: C.OALConfig, anchor_norms: Optional[torch.Tensor] = None, force: bool = False) -> StageResult:
    """k-NN boundary outlier embeddings [C, M, D] from the ID embeddings."""
    from oal.knn import sample_outliers

    d, fp = stage_dir(cfg, "knn"), knn_fp(cfg)
    if not force and is_done(d, fp):
        return _skipped("knn", d, fp)
    emb_file = stage_dir(cfg, "embeddings") / "id_embeddings.pt"
    emb = load_torch(emb_file, "ID embeddings")["embeddings"]
    out = sample_outliers(emb, cfg.knn, cfg.seed, anchor_norms)
    save_torch({"outliers": out}, d / "knn_outliers.pt")
    return _finish("knn", d, fp, cfg, {"outliers": d / "knn_outliers.pt"}, shape=list(out.shape))


def run_student(cfg: C.OALConfig, bench: Optional[Benchmark] = None, on_epoch_end: Optional[EpochHook] = None,
                accelerator: Any = None, progress: bool = True, force: bool = False) -> StageResult:
    """Train the OAL student: CE + KD from the frozen teacher + MICL against the outlier files."""
    d, fp = stage_dir(cfg, "student"), student_fp(cfg)
    if not force and is_done(d, fp):
        return _skipped("student", d, fp)
    bench = bench or build_benchmark(cfg.data)
    device = resolve_device(cfg.device)
    L = cfg.loss
    teacher = load_teacher(cfg, bench.num_classes) if (L.w_logit_kd > 0 or L.w_feat_kd > 0) else None
    knn = load_outliers(cfg.outliers.knn_path, "k-NN outlier") if L.w_micl_knn > 0 else None
    lat = load_outliers(cfg.outliers.latent_path, "latent outlier") if L.w_micl_lat > 0 else None
    net = build_student(cfg.model.student, bench.num_classes)
    loss = OALLoss(L, net.feature_dim, teacher.feature_dim if teacher is not None else None,
                   knn.shape[1] if knn is not None else None, lat.shape[1] if lat is not None else None)
    res = fit(net, bench.train, cfg.student, d, batch_size=cfg.data.batch_size, seed=cfg.seed, device=cfg.device,
              loss=loss, teacher=teacher, knn_outliers=knn, latent_outliers=lat,
              outlier_batch_size=L.outlier_batch_size, eval_fn=_val_fn(cfg, bench, device),
              on_epoch_end=on_epoch_end, progress=progress, num_workers=cfg.data.num_workers,
              meta={"arch": cfg.model.student, "num_classes": bench.num_classes, "fingerprint": fp},
              resume=_resume_ok(d / CHECKPOINT, fp), accelerator=accelerator)
    return _finish("student", d, fp, cfg, {"checkpoint": res.checkpoint},
                   history=res.history, resumed_from_epoch=res.resumed_from_epoch)


def run_evaluate(cfg: C.OALConfig, checkpoint: Optional[str] = None, bench: Optional[Benchmark] = None,
                 out_dir: Optional[Path] = None, force: bool = False) -> tuple[StageResult, Optional[EvalReport]]:
    """Score a student checkpoint on the ID test set and every near/far OOD test set."""
    ckpt = Path(checkpoint) if checkpoint else stage_dir(cfg, "student") / CHECKPOINT
    d = out_dir or stage_dir(cfg, "eval")
    fp = C.fingerprint("eval", _file_id(str(ckpt)) if checkpoint is None else str(ckpt), cfg.eval, cfg.data)
    if not force and is_done(d, fp):
        return _skipped("eval", d, fp), None
    bench = bench or build_benchmark(cfg.data)
    meta = load_torch(ckpt, "student checkpoint").get("meta", {})
    arch = meta.get("arch", cfg.model.student)
    net = build_student(arch, bench.num_classes)
    load_checkpoint_net(ckpt, net)
    report = evaluate(net, bench, cfg.eval, resolve_device(cfg.device), cfg.data.eval_batch_size)
    files = write_report(report, d, cfg.eval.primary, cfg.eval.plots)
    primary = report.results[cfg.eval.primary]
    return _finish("eval", d, fp, cfg, {"results": d / "results.json", "table": d / "results.md"},
                   checkpoint=str(ckpt), plots=[str(f) for f in files if f.suffix == ".png"],
                   id_accuracy=report.id_accuracy, near_auroc=primary.near["auroc"],
                   far_auroc=primary.far["auroc"]), report


def run_pipeline(cfg: C.OALConfig, progress: bool = True) -> dict[str, StageResult]:
    """All stages in order, single-process; each skipped when its outputs match its inputs."""
    from dataclasses import replace

    bench = build_benchmark(cfg.data)
    results: dict[str, StageResult] = {}
    results["teacher"] = run_teacher(cfg, bench, progress=progress)
    if cfg.loss.w_micl_knn > 0 and cfg.outliers.knn_path is None:
        results["embeddings"] = run_embeddings(cfg, bench)
        results["knn"] = run_knn(cfg)
        cfg = replace(cfg, outliers=replace(cfg.outliers, knn_path=results["knn"].outputs["outliers"]))
    results["student"] = run_student(cfg, bench, progress=progress)
    results["eval"] = run_evaluate(cfg, bench=bench)[0]
    return results
