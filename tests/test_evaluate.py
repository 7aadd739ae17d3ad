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
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.05]])
    s = KNNScore(bank, k=2)(torch.tensor([[1.0, 0.02], [0.0, 1.0]]))
    assert s[0] > s[1] and s[0] <= 0


def test_evaluate_report_and_plots(tmp_path):
    bench = build_benchmark(DataConfig(image_size=16))
    torch.manual_seed(0)
    net = build_student("resnet_tiny", bench.num_classes)
    report = evaluate(net, bench, EvalConfig(knn_k=3), "cpu", 512)
    assert set(report.results) == {"ebo", "msp", "mls", "knn"}
    ebo = report.results["ebo"]
    assert set(ebo.per_set) == {"digits678", "photo_patches", "noise"}
    assert ebo.near["auroc"] == pytest.approx(ebo.per_set["digits678"].auroc)
    assert ebo.far["auroc"] == pytest.approx((ebo.per_set["photo_patches"].auroc + ebo.per_set["noise"].auroc) / 2)
    assert 0 <= report.id_accuracy <= 1
    files = write_report(report, tmp_path, "ebo")
    names = {f.name for f in files}
    assert {"results.json", "results.md", "ebo_noise.png", "knn_digits678.png"} <= names
    assert (tmp_path / "plots" / "ebo_noise.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "results.md").read_text()
    assert md.index("| ebo |") < md.index("| msp |")
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
    assert set(sets) == {"id", "train", "ood:digits678", "ood:photo_patches", "ood:noise"}
    n = 3
    slices = [{k: shard(ds, i, n) for k, ds in sets.items()} for i in range(n)]
    assert sum(len(s["id"]) for s in slices) == len(bench.test) and len(slices[0]["id"]) < len(bench.test)
    parts = [{k: collect(net, ds, 64, "cpu") for k, ds in s.items()} for s in slices]  # other batches, too
    merged = {k: merge([p[k] for p in parts]) for k in sets}
    assert torch.equal(merged["id"].labels, torch.as_tensor([y for _, y in bench.test]))
    report = report_from_outputs(merged, bench.name, list(bench.near), list(bench.far), cfg)
    assert report.id_accuracy == whole.id_accuracy
    for pp, res in whole.results.items():
        for name, m in res.per_set.items():
            assert report.results[pp].per_set[name].auroc == pytest.approx(m.auroc, abs=1e-6), (pp, name)
    emb = per_class_sample(merged["train"], bench.num_classes, cap=20, seed=1)
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
