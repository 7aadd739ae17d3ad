"""OOD evaluation with OpenOOD v1.5's conventions: postprocessors, metrics, reports and plots.

A postprocessor maps a network's `(logits, features)` to a confidence where higher means more ID.
Metrics treat OOD as the positive class and negate the confidence, as OpenOOD v1.5 does (after its
fix of swapped AUPR-In / AUPR-Out, OpenOOD issue #211).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from sklearn import metrics as skm
from torch.utils.data import DataLoader, Dataset, Subset

from oal.config import EvalConfig
from oal.storage import atomic_path, write_json, write_text


@dataclass
class Outputs:
    logits: torch.Tensor  # (N, K)
    features: torch.Tensor  # (N, D)
    labels: torch.Tensor  # (N,), -1 for OOD


@torch.no_grad()
def collect(net: nn.Module, dataset: Dataset, batch_size: int, device: str | torch.device,
            num_workers: int = 0) -> Outputs:
    """The network's logits and features on `dataset`, in order. `num_workers` DataLoader processes decode the
    images; on a GPU the batches come in pinned memory and are copied while the GPU computes."""
    net = net.to(device).eval()  # a checkpoint loads on the CPU; the inputs go to `device`
    cuda = torch.device(device).type == "cuda"
    logits, feats, labels = [], [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=cuda):
        lo, fe = net(x.to(device, non_blocking=cuda))
        logits.append(lo.float().cpu())
        feats.append(fe.float().cpu())
        labels.append(torch.as_tensor(y))
    if not logits:  # an empty shard (more shards than images)
        return Outputs(torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))
    return Outputs(torch.cat(logits), torch.cat(feats), torch.cat(labels))


def shard(dataset: Dataset, index: int, count: int) -> Dataset:
    """The `index`-th of `count` contiguous slices of `dataset`: concatenating the slices' outputs in order gives
    the whole set's, image for image (each image's output does not depend on its batch in eval mode)."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} of {count} does not exist (expected 0 <= index < count)")
    if count == 1:
        return dataset
    n = len(dataset)  # type: ignore[arg-type]
    return Subset(dataset, range(n * index // count, n * (index + 1) // count))


def merge(parts: list[Outputs]) -> Outputs:
    """Concatenate shards' outputs in shard order (empty shards dropped)."""
    full = [p for p in parts if len(p.labels)] or parts[:1]
    return Outputs(torch.cat([p.logits for p in full]), torch.cat([p.features for p in full]),
                   torch.cat([p.labels for p in full]))


# ---- postprocessors: setup on ID training outputs (if needed), then score --------------------------

def msp_score(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1).amax(dim=-1)  # (N,)


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """EBO: T * logsumexp(logits / T), the negative free energy; higher = more ID."""
    return temperature * torch.logsumexp(logits / temperature, dim=-1)  # (N,)


def max_logit_score(logits: torch.Tensor) -> torch.Tensor:
    return logits.amax(dim=-1)  # (N,)


class KNNScore:
    """Negative distance to the K-th nearest L2-normalised ID training feature (Sun et al., 2022)."""

    def __init__(self, train_features: torch.Tensor, k: int):
        import faiss

        bank = torch.nn.functional.normalize(train_features.float(), dim=-1).numpy()  # (N_train, D)
        self.k = min(k, len(bank))
        self.index = faiss.IndexFlatL2(bank.shape[1])
        self.index.add(np.ascontiguousarray(bank))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return self.at(features, [self.k])[self.k]

    def at(self, features: torch.Tensor, ks: list[int]) -> dict[int, torch.Tensor]:
        """The score for each K in `ks` (each at most the bank's size) from one search of max(ks) neighbours."""
        q = torch.nn.functional.normalize(features.float(), dim=-1).numpy()  # (N, D)
        dist, _ = self.index.search(np.ascontiguousarray(q), max(ks))  # (N, max K) squared L2, nearest first
        return {k: -torch.from_numpy(np.sqrt(np.maximum(dist[:, k - 1], 0.0))) for k in ks}  # each (N,)


Scorer = Callable[[Outputs], torch.Tensor]


def build_postprocessor(name: str, cfg: EvalConfig, train: Outputs | None, knn_k: int | None = None) -> Scorer:
    """The score `name` (higher = more ID); `knn_k`: KNN's K when chosen on validation (default eval.knn_k)."""
    if name == "msp":
        return lambda o: msp_score(o.logits)
    if name == "ebo":
        return lambda o: energy_score(o.logits, cfg.ebo_temperature)
    if name == "mls":
        return lambda o: max_logit_score(o.logits)
    if name == "knn":
        if train is None:
            raise ValueError("the knn postprocessor needs the ID training set's features")
        knn = KNNScore(train.features, knn_k or cfg.knn_k)
        return lambda o: knn(o.features)
    raise ValueError(f"unknown postprocessor '{name}' (eval.postprocessors); registered: {', '.join(POSTPROCESSORS)}")


POSTPROCESSORS = ("msp", "ebo", "mls", "knn")
NEEDS_TRAIN = {"knn"}


# ---- metrics ---------------------------------------------------------------------------------------

@dataclass
class OODMetrics:
    auroc: float  # OOD positive, score negated (symmetric in the choice of positive class)
    fpr95: float  # OpenOOD v1.5: fraction of ID flagged OOD at the threshold that catches 95% of OOD
    fpr95_classic: float  # VOS/NPOS/Dream-OOD: fraction of OOD accepted when 95% of ID is accepted
    aupr_in: float  # ID positive, score as is
    aupr_out: float  # OOD positive, score negated
    n_id: int
    n_ood: int


def ood_metrics(id_conf: np.ndarray, ood_conf: np.ndarray, recall: float = 0.95) -> OODMetrics:
    conf = np.concatenate([id_conf, ood_conf]).astype(np.float64)
    # Following convention in ML we treat OOD as positive; higher conf means ID, so negate it.
    is_ood = np.concatenate([np.zeros(len(id_conf)), np.ones(len(ood_conf))])
    fpr, tpr, _ = skm.roc_curve(is_ood, -conf)
    fpr95 = float(fpr[np.argmax(tpr >= recall)])
    fpr_c, tpr_c, _ = skm.roc_curve(1 - is_ood, conf)  # ID positive: "tpr" = ID accepted
    fpr95_classic = float(fpr_c[np.argmax(tpr_c >= recall)])
    p_in, r_in, _ = skm.precision_recall_curve(1 - is_ood, conf)
    p_out, r_out, _ = skm.precision_recall_curve(is_ood, -conf)
    return OODMetrics(auroc=float(skm.auc(fpr, tpr)), fpr95=fpr95, fpr95_classic=fpr95_classic,
                      aupr_in=float(skm.auc(r_in, p_in)), aupr_out=float(skm.auc(r_out, p_out)),
                      n_id=len(id_conf), n_ood=len(ood_conf))


def accuracy(out: Outputs) -> float:
    return float((out.logits.argmax(-1) == out.labels).float().mean())


@dataclass
class PostprocessorResult:
    per_set: dict[str, OODMetrics]  # by OOD set name (near and far)
    near: dict[str, float]  # average of each metric over the near-OOD sets
    far: dict[str, float]  # average over the far-OOD sets
    val_auroc: float | None = None  # ID validation split vs the validation OOD sets: what the choice is made on


@dataclass
class EvalReport:
    benchmark: str
    id_accuracy: float
    near_sets: list[str]
    far_sets: list[str]
    results: dict[str, PostprocessorResult] = field(default_factory=dict)  # by postprocessor name
    # The postprocessor with the best validation AUROC (OpenOOD v1.5: ID validation split vs validation OOD, never
    # a test set); None when the benchmark has no validation OOD set
    chosen: str | None = None
    knn_k: int | None = None  # the KNN score's K (chosen on validation from eval.knn_k_search, or eval.knn_k)
    knn_k_val_auroc: dict[int, float] = field(default_factory=dict)  # validation AUROC of each K tried
    scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)  # for plots

    def headline(self, primary: str) -> str:
        """The postprocessor whose numbers lead: the one chosen on validation, else `primary` (eval.primary)."""
        return self.chosen or primary

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "scores"}
        return d


def _average(ms: list[OODMetrics]) -> dict[str, float]:
    keys = ("auroc", "fpr95", "fpr95_classic", "aupr_in", "aupr_out")
    return {k: float(np.mean([getattr(m, k) for m in ms])) if ms else float("nan") for k in keys}


def eval_sets(bench, cfg: EvalConfig) -> dict[str, Dataset]:
    """Every dataset an evaluation runs the network over: "id" (the ID test set), "train" (the ID training set,
    only for postprocessors that need it), each near/far OOD test set as "ood:<name>", and, where the benchmark
    has validation OOD sets, the ID validation split ("val_id") and each of them ("val_ood:<name>"): the score and
    KNN's K are chosen on those."""
    sets: dict[str, Dataset] = {"id": bench.test}
    if NEEDS_TRAIN & set(cfg.postprocessors):
        sets["train"] = bench.train_plain
    sets.update({f"ood:{name}": ds for name, ds in {**bench.near, **bench.far}.items()})
    if bench.ood_val:
        sets["val_id"] = bench.val
        sets.update({f"val_ood:{name}": ds for name, ds in bench.ood_val.items()})
    return sets


def evaluate(net: nn.Module, bench, cfg: EvalConfig, device: str | torch.device, batch_size: int,
             num_workers: int = 0) -> EvalReport:
    """Score the ID test set and every near/far OOD test set with each configured postprocessor."""
    net = net.to(device).eval()
    outs = {key: collect(net, ds, batch_size, device, num_workers) for key, ds in eval_sets(bench, cfg).items()}
    return report_from_outputs(outs, bench.name, list(bench.near), list(bench.far), cfg)


def report_from_outputs(outs: dict[str, Outputs], benchmark: str, near: list[str], far: list[str],
                        cfg: EvalConfig) -> EvalReport:
    """The report from the network's outputs on `eval_sets` (wherever and in however many shards they were
    computed)."""
    id_out = outs["id"]
    report = EvalReport(benchmark=benchmark, id_accuracy=accuracy(id_out), near_sets=near, far_sets=far)
    val_ood = [k for k in outs if k.startswith("val_ood:")]
    val = (outs["val_id"], [outs[k] for k in val_ood]) if "val_id" in outs and val_ood else None
    if "knn" in cfg.postprocessors:
        report.knn_k = cfg.knn_k
        if val is not None and cfg.knn_k_search and "train" in outs:
            report.knn_k, report.knn_k_val_auroc = choose_knn_k(outs["train"], val, cfg.knn_k_search)
    for pp in cfg.postprocessors:
        score = build_postprocessor(pp, cfg, outs.get("train"), report.knn_k)
        id_conf = score(id_out).numpy()
        per_set, scores = {}, {"id": id_conf}
        for name in (*near, *far):
            conf = score(outs[f"ood:{name}"]).numpy()
            scores[name] = conf
            per_set[name] = ood_metrics(id_conf, conf)
        report.results[pp] = PostprocessorResult(
            per_set=per_set, near=_average([per_set[n] for n in near]), far=_average([per_set[n] for n in far]),
            val_auroc=_val_auroc(score(val[0]).numpy(), [score(o).numpy() for o in val[1]]) if val else None)
        report.scores[pp] = scores
    if val is not None:  # the first of the best, in eval.postprocessors' order
        report.chosen = max(cfg.postprocessors, key=lambda pp: report.results[pp].val_auroc or 0.0)
    return report


def _val_auroc(id_conf: np.ndarray, ood_confs: list[np.ndarray]) -> float:
    """Mean AUROC of the ID validation split against each validation OOD set."""
    return float(np.mean([ood_metrics(id_conf, c).auroc for c in ood_confs]))


def choose_knn_k(train: Outputs, val: tuple[Outputs, list[Outputs]], ks: list[int]) -> tuple[int, dict[int, float]]:
    """KNN's K with the best validation AUROC among `ks` (those above the bank's size dropped; ties: the smaller K),
    and each K's validation AUROC: OpenOOD's convention of choosing a postprocessor's parameter on validation."""
    ks = sorted({k for k in ks if k <= len(train.features)}) or [len(train.features)]
    knn = KNNScore(train.features, max(ks))
    id_scores = knn.at(val[0].features, ks)
    ood_scores = [knn.at(o.features, ks) for o in val[1]]
    aurocs = {k: _val_auroc(id_scores[k].numpy(), [s[k].numpy() for s in ood_scores]) for k in ks}
    return max(ks, key=lambda k: (aurocs[k], -k)), aurocs


def validation_metrics(net: nn.Module, bench, cfg: EvalConfig, device: str | torch.device,
                       batch_size: int, num_workers: int = 0) -> dict[str, float]:
    """ID validation accuracy and validation-OOD AUROC (EBO): for model selection and tuning, never test."""
    training = net.training
    val = collect(net, bench.val, batch_size, device, num_workers)
    out = {"val/id_accuracy": accuracy(val)}
    id_conf = energy_score(val.logits, cfg.ebo_temperature).numpy()
    aurocs = []
    for ds in bench.ood_val.values():
        o = collect(net, ds, batch_size, device, num_workers)
        aurocs.append(ood_metrics(id_conf, energy_score(o.logits, cfg.ebo_temperature).numpy()).auroc)
    if aurocs:
        out["val/ood_auroc"] = float(np.mean(aurocs))
    net.train(training)
    return out


# ---- reports ---------------------------------------------------------------------------------------

def markdown_table(report: EvalReport, primary: str) -> str:
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    lines = [f"# OOD evaluation on `{report.benchmark}`", "",
             f"ID accuracy: **{pct(report.id_accuracy)}%**. Metrics in %; FPR@95 is OpenOOD v1.5's "
             "(ID flagged OOD at 95% OOD recall); FPR95-classic is VOS/NPOS's (OOD accepted at 95% ID recall).", "",
             _choice_line(report, primary), "",
             "| postprocessor | val AUROC | near AUROC | far AUROC | near FPR@95 | far FPR@95 | near FPR95-classic "
             "| far FPR95-classic |",
             "|---|---|---|---|---|---|---|---|"]
    head = report.headline(primary)
    order = [head] + [p for p in report.results if p != head]
    for pp in order:
        r = report.results[pp]
        lines.append(f"| {_label(pp, report.knn_k)}{' (chosen)' if pp == report.chosen else ''} | "
                     f"{pct(r.val_auroc) if r.val_auroc is not None else '-'} | {pct(r.near['auroc'])} | "
                     f"{pct(r.far['auroc'])} | {pct(r.near['fpr95'])} | {pct(r.far['fpr95'])} | "
                     f"{pct(r.near['fpr95_classic'])} | {pct(r.far['fpr95_classic'])} |")
    primary = head
    lines += ["", f"## Per OOD set ({primary})", "",
              "| set | kind | AUROC | FPR@95 | FPR95-classic | AUPR-In | AUPR-Out | n OOD |", "|---|---|---|---|---|---|---|---|"]
    for name, m in report.results[primary].per_set.items():
        kind = "near" if name in report.near_sets else "far"
        lines.append(f"| {name} | {kind} | {pct(m.auroc)} | {pct(m.fpr95)} | {pct(m.fpr95_classic)} | "
                     f"{pct(m.aupr_in)} | {pct(m.aupr_out)} | {m.n_ood} |")
    return "\n".join(lines) + "\n"


def _label(pp: str, knn_k: int | None) -> str:
    return f"{pp} (K={knn_k})" if pp == "knn" and knn_k else pp


def _choice_line(report: EvalReport, primary: str) -> str:
    if report.chosen is None:
        return (f"No validation OOD set: the table leads with eval.primary ({primary}), not a validation choice.")
    ks = (f"; KNN's K={report.knn_k} chosen the same way among {sorted(report.knn_k_val_auroc)}"
          if report.knn_k_val_auroc else "")
    return (f"Score chosen on validation (ID validation split vs the validation OOD sets, never a test set): "
            f"**{report.chosen}**{ks}.")


def comparison_table(rows: dict[str, tuple[dict, dict]], primary: str, benchmark: str) -> str:
    """Every trained network (label -> (results.json, stage manifest)) under every postprocessor: first each
    network under the score chosen on its validation data (eval.primary where there is none), then the rest;
    ID accuracy, validation AUROC and near/far AUROC and FPR@95, in %."""
    pct = lambda v: f"{100 * v:.2f}" if v is not None else "-"  # noqa: E731
    lines = [f"# `{benchmark}`: CE baseline vs OAL (metrics in %)", "",
             "Each network's first row is the score chosen on validation (ID validation split vs the validation OOD "
             "sets, never a test set), marked *chosen*; the rows after it are every other score, for reference.", "",
             "| model | score | weights | ID acc | val AUROC | near AUROC | far AUROC | near FPR@95 | far FPR@95 |",
             "|---|---|---|---|---|---|---|---|---|"]

    def row(label: str, res: dict, manifest: dict, pp: str) -> str:
        r = res["results"][pp]
        how = "chosen" if pp == res.get("chosen") else ("eval.primary, no validation OOD" if not res.get("chosen")
                                                        and pp == primary else "")
        name = _label(pp, res.get("knn_k")) + (f" *{how}*" if how else "")
        return (f"| {label} | {name} | {manifest.get('selected', 'last')} (epoch {manifest.get('epoch', '?')}) | "
                f"{pct(res['id_accuracy'])} | {pct(r.get('val_auroc'))} | {pct(r['near']['auroc'])} | "
                f"{pct(r['far']['auroc'])} | {pct(r['near']['fpr95'])} | {pct(r['far']['fpr95'])} |")

    heads = {label: res.get("chosen") or primary for label, (res, _) in rows.items()}
    lines += [row(label, res, m, heads[label]) for label, (res, m) in rows.items()]
    lines += [row(label, res, m, pp) for label, (res, m) in rows.items() for pp in res["results"] if pp != heads[label]]
    return "\n".join(lines) + "\n"


def write_report(report: EvalReport, out_dir: str | Path, primary: str, plots: bool = True) -> list[Path]:
    out = Path(out_dir)
    write_json(report.to_dict(), out / "results.json")
    write_text(markdown_table(report, primary), out / "results.md")
    files = [out / "results.json", out / "results.md"]
    if plots:
        files += _plots(report, out / "plots")
    return files


def _plots(report: EvalReport, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for pp, scores in report.scores.items():
        id_conf = scores["id"]
        for name, conf in scores.items():
            if name == "id":
                continue
            is_ood = np.concatenate([np.zeros(len(id_conf)), np.ones(len(conf))])
            fpr, tpr, _ = skm.roc_curve(is_ood, -np.concatenate([id_conf, conf]))
            fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
            a.plot(fpr, tpr, label=f"AUROC {100 * report.results[pp].per_set[name].auroc:.1f}")
            a.plot([0, 1], [0, 1], "k:", lw=0.8)
            a.set(xlabel="ID flagged OOD (FPR)", ylabel="OOD caught (TPR)", title=f"ROC {pp}: {name}")
            a.legend(loc="lower right")
            bins = np.linspace(min(id_conf.min(), conf.min()), max(id_conf.max(), conf.max()), 40)
            b.hist(id_conf, bins=bins, alpha=0.6, density=True, label="ID test")
            b.hist(conf, bins=bins, alpha=0.6, density=True, label=name)
            b.set(xlabel=f"{pp} score (higher = more ID)", title="score histogram")
            b.legend()
            fig.tight_layout()
            path = out / f"{pp}_{name}.png"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=80)
            plt.close(fig)
            files.append(path)
    return files


def load_report(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
