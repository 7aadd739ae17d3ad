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
    from oal import stages
    from oal.config import QUICK_OVERRIDES, load_config

    cfg = load_config("digits", [*QUICK_OVERRIDES, f"output_dir={tmp_path}", "base.epochs=1", "teacher.epochs=1",
                                 "data.num_workers=2", "eval.plots=false"])
    seen = []
    real = stages.collect
    monkeypatch.setattr(stages, "collect", lambda *a, **k: seen.append(a[4] if len(a) > 4 else k.get("num_workers"))
                        or real(*a, **k))
    for stage in ("base", "teacher"):
        res = stages.train_stage(cfg, stage, progress=False)
        stages.finish_training(cfg, stage, res.checkpoint, res.history)
    seen.clear()
    part = stages.eval_shard(cfg, str(stages.base_checkpoint(cfg)), of="base")
    assert len(seen) == len(part["outputs"]) and set(seen) == {2}
    seen.clear()
    stages.embeddings_shard(cfg)
    assert seen == [2]
