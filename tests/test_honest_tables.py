"""Tables lead with the score chosen on validation, never on a test set: the choice of postprocessor and of KNN's
K follows the validation sets even where the test sets would pick another, and every network appears under
every score after its chosen row."""

from __future__ import annotations

import pytest
import torch

from oal.config import EvalConfig
from oal.evaluate import Outputs, choose_knn_k, comparison_table, markdown_table, report_from_outputs

D = 4


def _outs(logit_shift: float, feat_shift: float, n: int = 60, seed: int = 0, ood: bool = False) -> Outputs:
    """Samples whose first logit is raised by `logit_shift` (ID: 4, a confident prediction) and whose features sit
    near +e0 moved by `feat_shift` towards -e0 (ID: 0): an OOD set with logit_shift=4 fools the logit scores (EBO,
    MSP, MLS), one with feat_shift=0 fools KNN, so that either can be made good or bad on its own."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 3, generator=g)
    logits[:, 0] += logit_shift
    feats = torch.randn(n, D, generator=g) * 0.3
    feats[:, 0] += 1.0 - feat_shift
    labels = torch.full((n,), -1) if ood else torch.zeros(n, dtype=torch.long)
    return Outputs(logits, feats, labels)


def _report(val_logit, val_feat, test_logit, test_feat, **cfg):
    """Validation OOD and both test OOD sets separable by the logits by `*_logit` (0..4) and by the features by
    `*_feat` (0..2)."""
    outs = {"train": _outs(4.0, 0.0, n=200, seed=1), "id": _outs(4.0, 0.0, seed=2),
            "ood:near": _outs(4.0 - test_logit, test_feat, seed=3, ood=True),
            "ood:far": _outs(4.0 - test_logit, test_feat, seed=4, ood=True),
            "val_id": _outs(4.0, 0.0, seed=5), "val_ood:v": _outs(4.0 - val_logit, val_feat, seed=6, ood=True)}
    cfg = EvalConfig(**{"postprocessors": ["ebo", "msp", "mls", "knn"], "plots": False, **cfg})
    return report_from_outputs(outs, "toy", ["near"], ["far"], cfg)


def test_the_score_is_chosen_on_validation_not_on_the_test_sets():
    # validation: only the features tell ID from OOD (KNN wins); the test sets favour the logit scores
    r = _report(val_logit=0.0, val_feat=2.0, test_logit=4.0, test_feat=0.0)
    assert r.chosen == "knn"
    assert r.results["knn"].val_auroc > 0.95 > r.results["ebo"].val_auroc
    assert r.results["ebo"].near["auroc"] > r.results["knn"].near["auroc"]  # the test sets would have picked EBO
    # and the other way round
    r = _report(val_logit=4.0, val_feat=0.0, test_logit=0.0, test_feat=2.0)
    assert r.chosen in ("ebo", "msp", "mls") and r.results["knn"].val_auroc < r.results[r.chosen].val_auroc


def test_knn_k_is_chosen_on_validation():
    train = Outputs(torch.zeros(0, 3), torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 40), torch.zeros(43))
    # validation ID points sit on the small cluster (+e0): with K <= 3 they are at distance 0, with K > 3 far away;
    # validation OOD points sit on the large cluster (+e1), at distance 0 for every K up to 40
    val_id = Outputs(torch.zeros(5, 3), torch.tensor([[1.0, 0.0]] * 5), torch.zeros(5))
    val_ood = Outputs(torch.zeros(5, 3), torch.tensor([[0.0, 1.0]] * 5), torch.full((5,), -1))
    k, aurocs = choose_knn_k(train, (val_id, [val_ood]), [1, 3, 10, 40, 1000])
    assert sorted(aurocs) == [1, 3, 10, 40]  # K above the bank's 43 features dropped
    assert aurocs[1] == aurocs[3] == pytest.approx(0.5) and aurocs[10] == aurocs[40] == pytest.approx(0.0)
    assert k == 1  # ties: the smaller K
    val_id, val_ood = val_ood, val_id  # now ID is the large cluster: every K > 3 separates perfectly
    k, aurocs = choose_knn_k(train, (val_id, [val_ood]), [1, 3, 10, 40])
    assert k == 10 and aurocs[10] == pytest.approx(1.0)


def test_the_chosen_k_is_the_k_the_test_scores_use():
    r = _report(val_logit=0.0, val_feat=2.0, test_logit=4.0, test_feat=0.0, knn_k_search=[1, 50], knn_k=7)
    assert r.knn_k in (1, 50) and set(r.knn_k_val_auroc) == {1, 50}
    fixed = _report(val_logit=0.0, val_feat=2.0, test_logit=4.0, test_feat=0.0, knn_k_search=[], knn_k=r.knn_k)
    assert r.scores["knn"]["near"] == pytest.approx(fixed.scores["knn"]["near"])
    assert fixed.knn_k == r.knn_k and fixed.knn_k_val_auroc == {}


def test_without_validation_ood_the_primary_score_leads_and_says_so():
    outs = {"train": _outs(4.0, 0.0, n=50, seed=1), "id": _outs(4.0, 0.0, seed=2),
            "ood:near": _outs(0.0, 2.0, seed=3, ood=True)}
    r = report_from_outputs(outs, "toy", ["near"], [], EvalConfig(plots=False, primary="msp"))
    assert r.chosen is None and r.headline("msp") == "msp" and r.knn_k == 10
    assert r.results["msp"].val_auroc is None
    md = markdown_table(r, "msp")
    assert "No validation OOD set" in md
    assert [line for line in md.splitlines() if line.startswith("| ")][1].startswith("| msp |")


def test_comparison_table_leads_with_each_networks_chosen_row_then_every_score():
    base = _report(val_logit=0.0, val_feat=2.0, test_logit=4.0, test_feat=0.0)
    oal = _report(val_logit=4.0, val_feat=0.0, test_logit=0.0, test_feat=2.0)
    rows = {"CE (base stage)": (_as_json(base), {"epoch": 3}), "OAL (student)": (_as_json(oal), {"epoch": 3})}
    md = comparison_table(rows, "ebo", "toy")
    body = [line for line in md.splitlines() if line.startswith("| CE") or line.startswith("| OAL")]
    assert len(body) == 2 * 4  # each network under each score
    assert body[0].startswith(f"| CE (base stage) | {base.chosen}") and "*chosen*" in body[0]
    assert body[1].startswith(f"| OAL (student) | {oal.chosen}") and "*chosen*" in body[1]
    assert sum("*chosen*" in line for line in body) == 2
    near = 100 * base.results[base.chosen].near["auroc"]
    assert f"| {near:.2f} |" in body[0]


def _as_json(report):
    import json

    return json.loads(json.dumps(report.to_dict()))
