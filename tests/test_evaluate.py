import json

import numpy as np
import pytest
import torch

from oal.config import DataConfig, EvalConfig
from oal.data import build_benchmark
from oal.evaluate import (
    KNNScore,
    Outputs,
    collect,
    energy_score,
    eval_sets,
    evaluate,
    max_logit_score,
    merge,
    msp_score,
    ood_metrics,
    report_from_outputs,
    shard,
    write_report,
)
from oal.models import build_student


def test_scores_by_hand():
    logits = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    assert energy_score(logits).tolist() == pytest.approx([np.log(np.exp(2) + 1), np.log(2 * np.e)])
    assert energy_score(logits, 2.0)[0].item() == pytest.approx(2 * np.log(np.exp(1) + 1))
    assert msp_score(logits).tolist() == pytest.approx([np.exp(2) / (np.exp(2) + 1), 0.5])
    assert max_logit_score(logits).tolist() == [2.0, 1.0]


def test_metrics_perfect_and_inverted():
    m = ood_metrics(np.array([5.0, 6, 7]), np.array([1.0, 2]))
    assert (m.auroc, m.fpr95, m.fpr95_classic, m.aupr_in, m.aupr_out) == (1.0, 0.0, 0.0, 1.0, 1.0)
    assert (m.n_id, m.n_ood) == (3, 2)
    m = ood_metrics(np.array([1.0, 2]), np.array([5.0, 6, 7]))
    assert m.auroc == 0.0 and m.fpr95 == 1.0 and m.fpr95_classic == 1.0


def test_two_fpr95_conventions_differ_as_defined():
    # 20 ID scores 1..20; 20 OOD scores: 19 low ones (-19..-1) and one at 100 (looks very ID).
    id_conf = np.arange(1, 21, dtype=float)
    ood_conf = np.concatenate([-np.arange(1, 20, dtype=float), [100.0]])
    m = ood_metrics(id_conf, ood_conf)
    # OpenOOD: catch 95% of OOD (19 of 20) with threshold just above -1: no ID flagged.
    assert m.fpr95 == 0.0
    # Classic: accept 95% of ID (19 of 20, threshold 2): the OOD at 100 is accepted -> 1/20.
    assert m.fpr95_classic == pytest.approx(0.05)
    # exactly 95% of ID accepted is enough: one more OOD score just above the lowest ID one stays rejected
    m_at = ood_metrics(id_conf, np.concatenate([ood_conf[:-2], [1.5, 100.0]]))
    assert m_at.fpr95_classic == pytest.approx(0.05)
    assert m.auroc == pytest.approx(1 - 20 / 400)  # 20 of 400 pairs mis-ordered
    # AUPR-In ranks ID as positive; AUPR-Out ranks OOD as positive: they are not swapped
    m2 = ood_metrics(np.array([10.0, 9]), np.array([0.0, 8, 7, 6, 5, 4]))
    assert m2.aupr_in == pytest.approx(1.0) and m2.aupr_out == pytest.approx(1.0)
    # Uninformative scores: each AUPR follows its own positive class's base rate (ID 8/10, OOD 2/10).
    # The PR curve runs from (recall 1, precision base) to (0, 1); its trapezoid area is (1 + base) / 2.
    m3 = ood_metrics(np.zeros(8), np.zeros(2))
    assert m3.aupr_in == pytest.approx(0.9) and m3.aupr_out == pytest.approx(0.6)


def test_knn_score_orders_by_distance():
    """The score is minus the Euclidean distance to the K-th nearest L2-normalised bank feature, pinned on a bank
    of unit vectors at 0, 60, 90 and 180 degrees (chords 2 sin(angle / 2): 0, 1, sqrt 2, 2) given at other
    lengths, so that normalising matters."""
    deg = torch.tensor([0.0, 60.0, 90.0, 180.0]) * torch.pi / 180
    bank = torch.stack([deg.cos(), deg.sin()], 1) * torch.tensor([[3.0], [0.5], [7.0], [2.0]])  # (4, 2)
    q = torch.tensor([[5.0, 0.0],  # at 0 degrees: chords 0, 1, sqrt 2, 2
                      [0.0, -0.2],  # at 270 degrees: chords sqrt 2, 2 sin(75), 2, sqrt 2
                      [-1.0, 0.0]])  # at 180 degrees: chords 0, sqrt 2, 2 sin(60), 2
    chords = lambda a: sorted(2 * np.sin(np.radians(abs(a - b)) / 2) for b in (0, 60, 90, 180))  # noqa: E731
    by_hand = np.array([chords(0), chords(270), chords(180)])  # (3, 4): each query's distances, nearest first
    assert by_hand[0].tolist() == pytest.approx([0.0, 1.0, np.sqrt(2), 2.0])
    for k in (1, 2, 3, 4):
        s = KNNScore(bank, k=k)(q)
        assert s.dtype == torch.float32 and s.shape == (3,)
        assert s.numpy() == pytest.approx(-by_hand[:, k - 1], abs=1e-5), k
    # k above the bank's size: the farthest point
    assert KNNScore(bank, k=50).k == 4
    assert KNNScore(bank, k=50)(q).numpy() == pytest.approx(-by_hand[:, 3], abs=1e-5)
    # nearer the bank = higher (more ID)
    s = KNNScore(bank[:3], k=2)(torch.tensor([[1.0, 0.02], [0.0, -1.0]]))
    assert s[0] > s[1] and s[0] <= 0
    # the knn postprocessor in the report is this score on the ID training features
    from oal.evaluate import build_postprocessor

    train = Outputs(torch.zeros(4, 3), bank, torch.zeros(4, dtype=torch.long))
    pp = build_postprocessor("knn", EvalConfig(knn_k=3), train)
    assert pp(Outputs(torch.zeros(3, 3), q, torch.zeros(3, dtype=torch.long))).numpy() == pytest.approx(
        -by_hand[:, 2], abs=1e-5)
    with pytest.raises(ValueError, match="needs the ID training set's features"):
        build_postprocessor("knn", EvalConfig(knn_k=3), None)


def _auroc_by_hand(id_conf: np.ndarray, ood_conf: np.ndarray) -> float:
    """P(an ID sample scores above an OOD one), ties counted half (the Mann-Whitney form of AUROC)."""
    diff = id_conf[:, None] - ood_conf[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def _forward(net, ds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The network on a whole TensorDataset in one batch (eval mode): (logits, features, labels)."""
    x, y = ds.tensors
    with torch.no_grad():
        logits, feat = net.eval()(x)
    return logits, feat, y


def test_evaluate_report_and_plots(tmp_path):
    bench = build_benchmark(DataConfig(image_size=16))
    torch.manual_seed(0)
    net = build_student("resnet_tiny", bench.num_classes)
    report = evaluate(net, bench, EvalConfig(knn_k=3, knn_k_search=[]), "cpu", 512)  # K fixed: checked by hand
    assert set(report.results) == {"ebo", "msp", "mls", "knn"}
    ebo = report.results["ebo"]
    assert set(ebo.per_set) == {"digits678", "photo_patches", "noise"}
    assert ebo.near["auroc"] == pytest.approx(ebo.per_set["digits678"].auroc)
    assert ebo.far["auroc"] == pytest.approx((ebo.per_set["photo_patches"].auroc + ebo.per_set["noise"].auroc) / 2)
    # the numbers, computed here from the network's own outputs on each set
    logits, feat, y = _forward(net, bench.test)
    assert report.id_accuracy == pytest.approx(float((logits.argmax(-1) == y).float().mean()), abs=1e-7)
    assert 0 < report.id_accuracy < 1
    _, train_feat, _ = _forward(net, bench.train_plain)
    bank = torch.nn.functional.normalize(train_feat, dim=-1)
    by_hand = {"ebo": lambda lo, fe: torch.logsumexp(lo, -1), "msp": lambda lo, fe: torch.softmax(lo, -1).amax(-1),
               "mls": lambda lo, fe: lo.amax(-1),
               "knn": lambda lo, fe: -torch.cdist(torch.nn.functional.normalize(fe, dim=-1), bank).kthvalue(3, -1).values}
    id_conf = {pp: f(logits, feat).numpy() for pp, f in by_hand.items()}
    for pp, f in by_hand.items():
        assert report.scores[pp]["id"] == pytest.approx(id_conf[pp], abs=1e-4), pp
        for name, ds in {**bench.near, **bench.far}.items():
            lo, fe, _ = _forward(net, ds)
            conf = f(lo, fe).numpy()
            assert report.scores[pp][name] == pytest.approx(conf, abs=1e-4), (pp, name)
            m = report.results[pp].per_set[name]
            assert m.auroc == pytest.approx(_auroc_by_hand(id_conf[pp], conf), abs=1e-3), (pp, name)
            assert (m.n_id, m.n_ood) == (len(bench.test), len(ds))
    files = write_report(report, tmp_path, "ebo")
    names = {f.name for f in files}
    plots = {f"{pp}_{name}.png" for pp in by_hand for name in ("digits678", "photo_patches", "noise")}
    assert names == {"results.json", "results.md"} | plots  # one ROC + histogram figure per postprocessor and set
    for p in plots:
        assert (tmp_path / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert report.benchmark == saved["benchmark"] == "digits"
    assert saved["id_accuracy"] == report.id_accuracy and saved["far_sets"] == ["photo_patches", "noise"]
    assert saved["results"]["knn"]["per_set"]["noise"]["auroc"] == report.results["knn"].per_set["noise"].auroc
    assert saved["results"]["ebo"]["near"] == pytest.approx(ebo.near)
    md = (tmp_path / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and line[2:5] in by_hand][:4]
    assert rows[0].startswith(f"| {report.chosen}") and "(chosen)" in rows[0]  # the validation choice leads
    assert f"ID accuracy: **{100 * report.id_accuracy:.2f}%**" in md
    head = report.results[report.chosen].per_set["noise"]  # the per-set table is the chosen score's
    assert f"| noise | far | {100 * head.auroc:.2f} |" in md
    assert not list(tmp_path.rglob("*.tmp"))


def test_outputs_dataclass_is_named():
    o = Outputs(torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
    assert o.features.shape == (1, 3)


def test_shards_merged_in_order_give_the_whole_sets_report_and_embeddings():
    """What a Ray job computes on n workers (each its slice of every set) equals one process's evaluation."""
    from oal.embeddings import class_embeddings, per_class_sample

    bench = build_benchmark(DataConfig(image_size=16))
    torch.manual_seed(0)
    net = build_student("resnet_tiny", bench.num_classes).eval()
    cfg = EvalConfig(knn_k=3)
    whole = evaluate(net, bench, cfg, "cpu", 512)
    sets = eval_sets(bench, cfg)
    assert set(sets) == {"id", "train", "ood:digits678", "ood:photo_patches", "ood:noise", "val_id", "val_ood:digit9"}
    n = 3
    slices = [{k: shard(ds, i, n) for k, ds in sets.items()} for i in range(n)]
    assert sum(len(s["id"]) for s in slices) == len(bench.test) and len(slices[0]["id"]) < len(bench.test)
    parts = [{k: collect(net, ds, 64, "cpu") for k, ds in s.items()} for s in slices]  # other batches, too
    merged = {k: merge([p[k] for p in parts]) for k in sets}
    # the merged outputs are the network's outputs on each whole set, image for image and in order (computed here
    # in one batch, without collect/shard/merge)
    for k, ds in sets.items():
        logits, feat, labels = _forward(net, ds)
        assert torch.equal(merged[k].labels, labels), k
        assert torch.allclose(merged[k].logits, logits, atol=1e-5) and torch.allclose(merged[k].features, feat,
                                                                                        atol=1e-5), k
    report = report_from_outputs(merged, bench.name, list(bench.near), list(bench.far), cfg)
    assert report.id_accuracy == whole.id_accuracy
    for pp, res in whole.results.items():
        for name, m in res.per_set.items():
            for key, value in vars(m).items():
                assert getattr(report.results[pp].per_set[name], key) == pytest.approx(value, abs=1e-6), (pp, name, key)
        assert report.results[pp].near == pytest.approx(res.near, abs=1e-6)
        assert report.results[pp].far == pytest.approx(res.far, abs=1e-6)
        for name, conf in whole.scores[pp].items():
            assert report.scores[pp][name] == pytest.approx(conf, abs=1e-5), (pp, name)
    # k-NN's ID embeddings from the merged training outputs: cap=20 features of each class, each one the network's
    # feature of a distinct training image of that class
    emb = per_class_sample(merged["train"], bench.num_classes, cap=20, seed=1)
    assert emb.shape == (bench.num_classes, 20, net.feature_dim)
    _, train_feat, train_y = _forward(net, bench.train_plain)
    for c in range(bench.num_classes):
        match = torch.cdist(emb[c], train_feat).argmin(1)  # (20,): the training image each row is
        assert torch.allclose(emb[c], train_feat[match], atol=1e-5)
        assert (train_y[match] == c).all() and len(set(match.tolist())) == 20
    assert torch.allclose(emb, class_embeddings(net, bench.train_plain, bench.num_classes, 20, "cpu", seed=1),
                          atol=1e-5)
    # more shards than images: the empty ones merge away
    tiny = torch.utils.data.Subset(bench.test, range(2))
    outs = [collect(net, shard(tiny, i, 4), 8, "cpu") for i in range(4)]
    assert [len(o.labels) for o in outs] == [0, 1, 0, 1] and len(merge(outs).labels) == 2
    with pytest.raises(ValueError, match="shard 4 of 4 does not exist"):
        shard(tiny, 4, 4)


class _WhichWorker(torch.utils.data.Dataset):
    """Images of the digits test set, labelled with the DataLoader worker that loaded them (-1: the main process)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return 64

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        return self.base[i][0], -1 if info is None else info.id


def test_collect_loads_in_worker_processes_with_the_same_outputs():
    bench = build_benchmark(DataConfig(image_size=16))
    torch.manual_seed(0)
    net = build_student("resnet_tiny", bench.num_classes).eval()
    ds = _WhichWorker(bench.test)
    alone, two = collect(net, ds, 8, "cpu"), collect(net, ds, 8, "cpu", num_workers=2)
    assert set(alone.labels.tolist()) == {-1} and set(two.labels.tolist()) == {0, 1}
    assert torch.allclose(alone.logits, two.logits, atol=1e-6)


def test_evaluation_and_embedding_shards_use_data_num_workers(tmp_path, monkeypatch):
    """data.num_workers reaches every pass over the data, not only training (image decoding at 224 px)."""
    from oal import registry, stages
    from oal.config import QUICK_OVERRIDES, load_config

    cfg = load_config("digits", [*QUICK_OVERRIDES, f"output_dir={tmp_path}", "base.epochs=1", "teacher.epochs=1",
                                 "data.num_workers=2", "eval.plots=false"])
    seen = []
    real = stages.collect
    monkeypatch.setattr(stages, "collect", lambda *a, **k: seen.append(a[4] if len(a) > 4 else k.get("num_workers"))
                        or real(*a, **k))
    for stage in ("base", "teacher"):
        res = registry.train_stage(cfg, stage, progress=False)
        stages.finish_training(cfg, stage, registry.fingerprint(stage, cfg), res.checkpoint, res.history)
    seen.clear()
    part = stages.eval_shard(cfg, str(stages.base_checkpoint(cfg)), of="base")
    assert len(seen) == len(part["outputs"]) and set(seen) == {2}
    seen.clear()
    stages.embeddings_shard(cfg)
    assert seen == [2]


# ---- small pieces by hand (fast: no network, no benchmark) ----------------------------------------------------

def _metrics(a: float, f: float, n_ood: int = 4):
    from oal.evaluate import OODMetrics

    return OODMetrics(auroc=a, fpr95=f, fpr95_classic=f / 2, aupr_in=0.5, aupr_out=0.25, n_id=3, n_ood=n_ood)


def _small_report():
    from oal.evaluate import EvalReport, PostprocessorResult

    r = EvalReport(benchmark="toy", id_accuracy=0.875, near_sets=["near1"], far_sets=["far1", "far2"])
    per = {"near1": _metrics(0.9, 0.2), "far1": _metrics(0.8, 0.4, 5), "far2": _metrics(0.6, 0.6, 6)}
    near, far = {"auroc": 0.9, "fpr95": 0.2, "fpr95_classic": 0.1}, {"auroc": 0.7, "fpr95": 0.5, "fpr95_classic": 0.25}
    r.results = {"msp": PostprocessorResult(per, near, far), "ebo": PostprocessorResult(per, far, near)}
    g = np.random.default_rng(0)
    r.scores = {pp: {"id": g.normal(1, 1, 30), "near1": g.normal(0, 1, 20), "far1": g.normal(-1, 1, 25),
                     "far2": g.normal(-2, 1, 25)} for pp in ("msp", "ebo")}
    return r


def test_markdown_table_by_hand():
    from oal.evaluate import markdown_table

    report = _small_report()
    md = markdown_table(report, "ebo")
    lines = md.splitlines()
    assert lines[0] == "# OOD evaluation on `toy`" and lines[1] == ""
    assert lines[2].startswith("ID accuracy: **87.50%**. Metrics in %; FPR@95 is OpenOOD v1.5's")
    assert lines[4] == "No validation OOD set: the table leads with eval.primary (ebo), not a validation choice."
    assert lines[6] == ("| postprocessor | val AUROC | near AUROC | far AUROC | near FPR@95 | far FPR@95 | "
                        "near FPR95-classic | far FPR95-classic |")
    # without a validation choice eval.primary leads, then the others in report order (near/far swapped for ebo in
    # this toy report)
    assert lines[8:10] == ["| ebo | - | 70.00 | 90.00 | 50.00 | 20.00 | 25.00 | 10.00 |",
                           "| msp | - | 90.00 | 70.00 | 20.00 | 50.00 | 10.00 | 25.00 |"]
    i = lines.index("## Per OOD set (ebo)")
    assert lines[i + 2] == "| set | kind | AUROC | FPR@95 | FPR95-classic | AUPR-In | AUPR-Out | n OOD |"
    assert lines[i + 4:] == ["| near1 | near | 90.00 | 20.00 | 10.00 | 50.00 | 25.00 | 4 |",
                             "| far1 | far | 80.00 | 40.00 | 20.00 | 50.00 | 25.00 | 5 |",
                             "| far2 | far | 60.00 | 60.00 | 30.00 | 50.00 | 25.00 | 6 |"]
    assert md == "\n".join([
        "# OOD evaluation on `toy`", "",
        "ID accuracy: **87.50%**. Metrics in %; FPR@95 is OpenOOD v1.5's (ID flagged OOD at 95% OOD recall); "
        "FPR95-classic is VOS/NPOS's (OOD accepted at 95% ID recall).", "",
        "No validation OOD set: the table leads with eval.primary (ebo), not a validation choice.", "",
        lines[6], "|---|---|---|---|---|---|---|---|", *lines[8:10], "",
        "## Per OOD set (ebo)", "",
        lines[i + 2], "|---|---|---|---|---|---|---|---|", *lines[i + 4:]]) + "\n"
    # a validation choice without a K search: no K sentence; KNN's row names its K
    report.chosen, report.knn_k = "msp", 7
    report.results["knn"] = report.results["ebo"]
    lines = markdown_table(report, "ebo").splitlines()
    assert lines[4] == ("Score chosen on validation (ID validation split vs the validation OOD sets, never a test set): "
                        "**msp**.")
    assert lines[10].startswith("| knn (K=7) | - | 70.00 |")
    del report.results["knn"]
    # with a validation choice: the chosen score leads, marked, with its validation AUROC and KNN's K
    report.chosen, report.knn_k, report.knn_k_val_auroc = "msp", 10, {10: 0.95, 5: 0.9}
    report.results["msp"].val_auroc, report.results["ebo"].val_auroc = 0.955, 0.9
    lines = markdown_table(report, "ebo").splitlines()
    assert lines[4] == ("Score chosen on validation (ID validation split vs the validation OOD sets, never a test set): "
                        "**msp**; KNN's K=10 chosen the same way among [5, 10].")
    assert lines[8:10] == ["| msp (chosen) | 95.50 | 90.00 | 70.00 | 20.00 | 50.00 | 10.00 | 25.00 |",
                           "| ebo | 90.00 | 70.00 | 90.00 | 50.00 | 20.00 | 25.00 | 10.00 |"]
    assert "## Per OOD set (msp)" in lines


def test_comparison_table_by_hand():
    from oal.evaluate import comparison_table

    r = lambda v, na, fa: {"val_auroc": v, "near": {"auroc": na, "fpr95": 0.5}, "far": {"auroc": fa, "fpr95": 0.25}}  # noqa: E731
    ce = {"id_accuracy": 0.9, "results": {"ebo": r(None, 0.81234, 0.7), "knn": r(None, 0.6, 0.65)}, "knn_k": 5}
    oal = {"id_accuracy": 0.875, "chosen": "knn", "knn_k": 50,
           "results": {"ebo": r(0.8, 0.7, 0.6), "knn": r(0.85, 0.75, 0.8)}}
    text = comparison_table({"CE": (ce, {"selected": "best", "epoch": 7}), "OAL": (oal, {})}, "ebo", "digits")
    assert text == (
        "# `digits`: CE baseline vs OAL (metrics in %)\n\n"
        "Each network's first row is the score chosen on validation (ID validation split vs the validation OOD sets, "
        "never a test set), marked *chosen*; the rows after it are every other score, for reference.\n\n"
        "| model | score | weights | ID acc | val AUROC | near AUROC | far AUROC | near FPR@95 | far FPR@95 |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        "| CE | ebo *eval.primary, no validation OOD* | best (epoch 7) | 90.00 | - | 81.23 | 70.00 | 50.00 | 25.00 |\n"
        "| OAL | knn (K=50) *chosen* | last (epoch ?) | 87.50 | 85.00 | 75.00 | 80.00 | 50.00 | 25.00 |\n"
        "| CE | knn (K=5) | best (epoch 7) | 90.00 | - | 60.00 | 65.00 | 50.00 | 25.00 |\n"
        "| OAL | ebo | last (epoch ?) | 87.50 | 80.00 | 70.00 | 60.00 | 50.00 | 25.00 |\n")


def test_write_and_load_report_and_each_plot(tmp_path, monkeypatch):
    import matplotlib.figure

    from oal.evaluate import load_report

    report = _small_report()
    figures = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: figures.append((fig, k)) or real(fig, *a, **k))
    files = write_report(report, tmp_path / "out", "msp")
    names = ["results.json", "results.md"] + [f"{pp}_{s}.png" for pp in ("msp", "ebo") for s in ("near1", "far1", "far2")]
    assert [f.name for f in files] == names
    assert all(f.parent == tmp_path / "out" / "plots" for f in files[2:])
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files[2:]) and not _tmp(tmp_path)
    loaded = load_report(tmp_path / "out" / "results.json")
    assert loaded == json.loads(json.dumps(report.to_dict())) and "scores" not in loaded
    assert loaded["results"]["ebo"]["near"] == {"auroc": 0.7, "fpr95": 0.5, "fpr95_classic": 0.25}
    assert (tmp_path / "out" / "results.md").read_text().startswith("# OOD evaluation on `toy`")
    # each figure: the ROC of that set (OOD positive, score negated) and the two score histograms
    assert len(figures) == 6
    fig, kw = figures[1]  # msp, far1
    assert kw == {"format": "png", "dpi": 80} and tuple(fig.get_size_inches()) == pytest.approx((9, 3.6))
    roc, hist = fig.axes
    id_conf, conf = report.scores["msp"]["id"], report.scores["msp"]["far1"]
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.r_[np.zeros(30), np.ones(25)], -np.r_[id_conf, conf])
    line = roc.get_lines()[0]
    assert np.allclose(line.get_xdata(), fpr) and np.allclose(line.get_ydata(), tpr)
    assert [t.get_text() for t in roc.get_legend().get_texts()] == ["AUROC 80.0"]
    assert (roc.get_xlabel(), roc.get_ylabel(), roc.get_title()) == ("ID flagged OOD (FPR)", "OOD caught (TPR)",
                                                                     "ROC msp: far1")
    diag = roc.get_lines()[1]
    assert list(diag.get_xdata()) == [0, 1] and list(diag.get_ydata()) == [0, 1] and diag.get_linestyle() == ":"
    assert diag.get_color() == "k" and diag.get_linewidth() == 0.8
    assert roc.get_legend()._loc == 4  # lower right
    assert (fig.subplotpars.left, fig.subplotpars.wspace) != (0.125, 0.2)  # tight_layout, not the defaults
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # every figure closed after it was saved
    assert [t.get_text() for t in hist.get_legend().get_texts()] == ["ID test", "far1"]
    assert (hist.get_xlabel(), hist.get_title()) == ("msp score (higher = more ID)", "score histogram")
    bars = hist.patches
    assert len(bars) == 2 * 39  # 40 bin edges from the lowest to the highest score of the two
    assert bars[0].get_x() == pytest.approx(min(id_conf.min(), conf.min()))
    assert bars[38].get_x() + bars[38].get_width() == pytest.approx(max(id_conf.max(), conf.max()))
    assert bars[0].get_alpha() == bars[39].get_alpha() == 0.6
    assert [b.get_x() for b in bars[:39]] == pytest.approx([b.get_x() for b in bars[39:]])  # the same bins
    widths = np.array([b.get_width() for b in bars[:39]])
    for part in (bars[:39], bars[39:]):  # each histogram a density
        assert np.sum(widths * np.array([b.get_height() for b in part])) == pytest.approx(1.0)
    assert roc.get_position().x1 < hist.get_position().x0  # side by side: the ROC left, the histograms right
    assert write_report(report, tmp_path / "np", "msp", plots=False) == [tmp_path / "np" / "results.json",
                                                                         tmp_path / "np" / "results.md"]
    assert not (tmp_path / "np" / "plots").exists()


def _tmp(folder):
    return list(folder.rglob("*.tmp"))


def test_postprocessors_by_name_and_ebo_temperature():
    from oal.evaluate import NEEDS_TRAIN, POSTPROCESSORS, build_postprocessor

    assert POSTPROCESSORS == ("msp", "ebo", "mls", "knn") and NEEDS_TRAIN == {"knn"}
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    o = Outputs(logits, torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    cfg = EvalConfig(ebo_temperature=3.0)
    assert build_postprocessor("msp", cfg, None)(o).tolist() == pytest.approx(torch.softmax(logits, -1).amax(-1).tolist())
    assert build_postprocessor("mls", cfg, None)(o).tolist() == [2.0, 0.5]
    assert build_postprocessor("ebo", cfg, None)(o).tolist() == pytest.approx(
        (3.0 * torch.logsumexp(logits / 3.0, -1)).tolist())
    assert energy_score(logits).tolist() == pytest.approx(torch.logsumexp(logits, -1).tolist())  # T = 1 by default
    with pytest.raises(ValueError, match=r"^unknown postprocessor 'odin' \(eval.postprocessors\); registered: msp, "
                                         r"ebo, mls, knn$"):
        build_postprocessor("odin", cfg, None)


def test_shard_slices_merge_accuracy_and_averages():
    from oal.evaluate import _average, accuracy

    ds = torch.utils.data.TensorDataset(torch.arange(10))
    parts = [shard(ds, i, 3) for i in range(3)]
    assert [[int(x[0]) for x in p] for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert shard(ds, 0, 1) is ds
    for i, n in ((3, 3), (-1, 3), (0, 0)):
        with pytest.raises(ValueError, match=rf"^shard {i} of {n} does not exist \(expected 0 <= index < count\)$"):
            shard(ds, i, n)
    o = lambda lo, lab: Outputs(torch.tensor(lo), torch.tensor(lo) * 2, torch.tensor(lab))  # noqa: E731
    a, b = o([[1.0, 0.0], [0.0, 1.0]], [0, 0]), o([[0.0, 3.0]], [1])
    m = merge([a, b])
    assert m.labels.tolist() == [0, 0, 1] and m.logits.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]]
    assert torch.equal(m.features, m.logits * 2)
    assert accuracy(m) == pytest.approx(2 / 3)
    empty = Outputs(torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, dtype=torch.long))
    assert merge([empty, empty]).labels.shape == (0,)
    assert merge([empty, b, empty]).labels.tolist() == [1]
    avg = _average([_metrics(0.9, 0.2), _metrics(0.5, 0.4)])
    assert avg == pytest.approx({"auroc": 0.7, "fpr95": 0.3, "fpr95_classic": 0.15, "aupr_in": 0.5, "aupr_out": 0.25})
    assert all(np.isnan(v) for v in _average([]).values()) and len(_average([])) == 5


def test_eval_sets_and_validation_metrics_by_hand():
    from types import SimpleNamespace

    from oal.evaluate import validation_metrics

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    two = lambda x: (net(x), x)  # noqa: E731  (logits, features)
    model = SimpleNamespace()
    g = torch.Generator().manual_seed(1)
    val_x, val_y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    ood = {"a": torch.randn(15, 4, generator=g) + 2, "b": torch.randn(10, 4, generator=g)}
    ds = lambda x, y: torch.utils.data.TensorDataset(x, y)  # noqa: E731
    bench = SimpleNamespace(val=ds(val_x, val_y), ood_val={k: ds(v, torch.full((len(v),), -1)) for k, v in ood.items()},
                            test="T", train_plain="P", near={"n": "N"}, far={"f": "F"})

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = net

        def forward(self, x):
            return two(x)

    model = Net()
    cfg = EvalConfig(ebo_temperature=2.0)
    for training in (True, False):
        model.train(training)
        out = validation_metrics(model, bench, cfg, "cpu", batch_size=7)
        assert model.training == training  # the caller's mode is kept
    with torch.no_grad():
        acc = float((net(val_x).argmax(-1) == val_y).float().mean())
        s_id = (2.0 * torch.logsumexp(net(val_x) / 2.0, -1)).numpy()
        aurocs = [_auroc_by_hand(s_id, (2.0 * torch.logsumexp(net(v) / 2.0, -1)).numpy()) for v in ood.values()]
    assert set(out) == {"val/id_accuracy", "val/ood_auroc"}
    assert out["val/id_accuracy"] == pytest.approx(acc) and out["val/ood_auroc"] == pytest.approx(np.mean(aurocs))
    bench.ood_val = {}
    assert set(validation_metrics(model, bench, cfg, "cpu", batch_size=7)) == {"val/id_accuracy"}
    # the sets an evaluation runs over: the ID training set only for postprocessors that need it
    assert eval_sets(bench, EvalConfig(postprocessors=["ebo", "msp"])) == {"id": "T", "ood:n": "N", "ood:f": "F"}
    assert list(eval_sets(bench, EvalConfig(postprocessors=["knn"]))) == ["id", "train", "ood:n", "ood:f"]


def test_knn_k_chosen_on_validation_by_hand():
    """Bank: a pair at 0/2 degrees, one point at 90, a pair at 180/182. Validation ID points sit inside the pairs;
    the validation OOD point sits on the lone point, so K=1 scores it as ID (AUROC 0) and K=2 as far (AUROC 1)."""
    from oal.evaluate import choose_knn_k

    def at(*deg):
        a = torch.tensor(deg, dtype=torch.float64) * torch.pi / 180
        return torch.stack([a.cos(), a.sin()], -1).float()

    out = lambda f: Outputs(torch.zeros(len(f), 2), f, torch.zeros(len(f), dtype=torch.long))  # noqa: E731
    train, val_id, val_ood = out(at(0, 2, 90, 180, 182)), out(at(1, 181)), out(at(90))
    k, aurocs = choose_knn_k(train, (val_id, [val_ood]), [2, 1, 100])  # 100 > the bank's 5 points: dropped
    assert (k, aurocs) == (2, {1: 0.0, 2: 1.0})
    scores = KNNScore(train.features, 5).at(val_id.features, [1, 2, 5])
    chord = lambda d: 2 * np.sin(np.radians(d) / 2)  # noqa: E731
    assert scores[1].numpy() == pytest.approx([-chord(1), -chord(1)], abs=1e-5)
    assert scores[2].numpy() == pytest.approx([-chord(1), -chord(1)], abs=1e-5)
    assert scores[5].numpy() == pytest.approx([-chord(181), -chord(179)], abs=1e-5)
    # a tie goes to the smaller K (an OOD point at 270 degrees is farther than every ID point at K=1 and K=2); the
    # bank's size itself is a K; with every K above the bank's size, the bank's size
    assert choose_knn_k(train, (val_id, [out(at(270))]), [2, 1]) == (1, {1: 1.0, 2: 1.0})
    assert sorted(choose_knn_k(train, (val_id, [val_ood]), [5, 1])[1]) == [1, 5]
    assert choose_knn_k(train, (val_id, [val_ood]), [50, 60]) == (5, {5: 0.0})  # K=5: the OOD point 92 deg from its farthest
    # two validation OOD sets: their mean AUROC
    _, two = choose_knn_k(train, (val_id, [val_ood, out(at(270))]), [1])
    assert two == {1: pytest.approx((0.0 + 1.0) / 2)}


def test_report_chooses_the_score_on_validation():
    """With validation outputs, the postprocessor with the best validation AUROC is chosen (the first of the best in
    eval.postprocessors' order) and leads the tables; KNN's K too."""
    g = torch.Generator().manual_seed(0)
    o = lambda lo, fe: Outputs(lo, fe, torch.zeros(len(lo), dtype=torch.long))  # noqa: E731
    # logits: ID confident, OOD flat (msp/ebo/mls separate them); features: all alike (knn cannot)
    id_lo = torch.tensor([[5.0, 0.0]]).repeat(6, 1) + 0.1 * torch.randn(6, 2, generator=g)
    ood_lo = 0.1 * torch.randn(6, 2, generator=g)
    feat = lambda n: torch.nn.functional.normalize(torch.ones(n, 3) + 0.01 * torch.randn(n, 3, generator=g), dim=-1)  # noqa: E731
    outs = {"id": o(id_lo, feat(6)), "train": o(id_lo, feat(6)), "ood:n": o(ood_lo, feat(6)), "ood:f": o(ood_lo, feat(6)),
            "val_id": o(id_lo, feat(6)), "val_ood:v": o(ood_lo, feat(6))}
    cfg = EvalConfig(postprocessors=["knn", "mls", "msp", "ebo"], knn_k=3, knn_k_search=[1, 2])
    report = report_from_outputs(outs, "toy", ["n"], ["f"], cfg)
    assert report.chosen == "mls" and report.headline("ebo") == "mls"  # msp and ebo tie with it: the first wins
    assert report.results["mls"].val_auroc == 1.0 and report.results["knn"].val_auroc < 1.0
    assert report.knn_k in (1, 2) and sorted(report.knn_k_val_auroc) == [1, 2] and report.benchmark == "toy"
    # the KNN score of the report is the one at the chosen K, not eval.knn_k
    expected = KNNScore(outs["train"].features, report.knn_k)(outs["id"].features).numpy()
    assert report.scores["knn"]["id"] == pytest.approx(expected)
    assert report.knn_k_val_auroc[report.knn_k] == max(report.knn_k_val_auroc.values())
    # the rest of the report, from the same outputs by hand
    from oal.evaluate import accuracy

    assert report.id_accuracy == accuracy(outs["id"]) and (report.near_sets, report.far_sets) == (["n"], ["f"])
    for pp in cfg.postprocessors:
        score = (lambda o: KNNScore(outs["train"].features, report.knn_k)(o.features)) if pp == "knn" else {
            "mls": lambda o: o.logits.amax(-1), "msp": lambda o: torch.softmax(o.logits, -1).amax(-1),
            "ebo": lambda o: torch.logsumexp(o.logits, -1)}[pp]
        conf = {k: score(outs[k]).numpy() for k in ("id", "ood:n", "ood:f")}
        res = report.results[pp]
        assert set(report.scores[pp]) == {"id", "n", "f"}
        for name in ("n", "f"):
            assert report.scores[pp][name] == pytest.approx(conf[f"ood:{name}"], abs=1e-5)
            assert vars(res.per_set[name]) == pytest.approx(vars(ood_metrics(conf["id"], conf[f"ood:{name}"])))
        assert res.near == pytest.approx({k: v for k, v in vars(res.per_set["n"]).items() if not k.startswith("n_")})
        assert res.far == pytest.approx({k: v for k, v in vars(res.per_set["f"]).items() if not k.startswith("n_")})
    # a score whose validation AUROC is 0 is not taken for a perfect one: ID flat, OOD confident (the logit scores
    # have it backwards, AUROC 0) and features apart (KNN separates them, AUROC 1): KNN, last in the order, wins
    feats = lambda n, d: torch.nn.functional.normalize(torch.eye(3)[d].repeat(n, 1), dim=-1)  # noqa: E731
    swap = {"id": o(ood_lo, feats(6, 0)), "train": o(ood_lo, feats(6, 0)), "ood:n": o(id_lo, feats(6, 1)),
            "ood:f": o(id_lo, feats(6, 2)), "val_id": o(ood_lo, feats(6, 0)), "val_ood:v": o(id_lo, feats(6, 1))}
    last = report_from_outputs(swap, "toy", ["n"], ["f"], EvalConfig(postprocessors=["mls", "msp", "ebo", "knn"],
                                                                     knn_k=2, knn_k_search=[]))
    assert [last.results[pp].val_auroc for pp in ("mls", "msp", "ebo", "knn")] == [0.0, 0.0, 0.0, 1.0]
    assert last.chosen == "knn"
    # an ID validation split without a validation OOD set: nothing to choose on
    only_id = report_from_outputs({k: v for k, v in outs.items() if k != "val_ood:v"}, "toy", ["n"], ["f"], cfg)
    assert only_id.chosen is None and only_id.knn_k == 3 and only_id.results["ebo"].val_auroc is None
    no_val = report_from_outputs({k: v for k, v in outs.items() if not k.startswith("val")}, "toy", ["n"], ["f"], cfg)
    assert no_val.chosen is None and no_val.headline("ebo") == "ebo" and no_val.knn_k == 3
    assert all(r.val_auroc is None for r in no_val.results.values()) and no_val.knn_k_val_auroc == {}


def test_evaluate_and_validation_pass_num_workers_to_every_set(monkeypatch):
    """Every pass over the data gets the caller's DataLoader workers (0 unless given), and evaluate puts the network
    on the device it names."""
    from types import SimpleNamespace

    import oal.evaluate as E

    seen = []
    real = E.collect
    monkeypatch.setattr(E, "collect", lambda net, ds, bs, device, num_workers=0: seen.append((bs, device, num_workers))
                        or real(net, ds, bs, device, 0))
    g = torch.Generator().manual_seed(0)
    ds = lambda n, lab: torch.utils.data.TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.full((n,), lab))  # noqa: E731
    bench = SimpleNamespace(name="toy", test=ds(6, 0), train_plain=ds(6, 1), val=ds(5, 0), near={"n": ds(4, -1)},
                            far={"f": ds(4, -1)}, ood_val={"v": ds(3, -1)})
    net = build_student("resnet_tiny", 2)
    report = evaluate(net, bench, EvalConfig(knn_k=2, knn_k_search=[]), "cpu", 4, num_workers=3)
    assert len(seen) == 6 and set(seen) == {(4, "cpu", 3)}  # id, train, n, f, val_id, val_ood:v
    assert report.benchmark == "toy" and report.chosen is not None
    seen.clear()
    evaluate(net, bench, EvalConfig(postprocessors=["ebo"]), "cpu", 4)
    assert {w for *_, w in seen} == {0}
    seen.clear()
    from oal.evaluate import validation_metrics

    validation_metrics(net, bench, EvalConfig(), "cpu", 4, num_workers=2)
    assert seen == [(4, "cpu", 2), (4, "cpu", 2)]  # the validation split, then each validation OOD set
    seen.clear()
    validation_metrics(net, bench, EvalConfig(), "cpu", 4)
    assert [w for *_, w in seen] == [0, 0]
