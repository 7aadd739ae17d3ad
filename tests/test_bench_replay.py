"""bench.tune_budget.replay: Ray's ASHAScheduler replayed over recorded per-epoch results (no Ray cluster)."""

import argparse
from dataclasses import replace

import pytest

from bench import tune_budget as tb
from jobs import tune as jtune
from oal import stages
from oal.storage import write_json

EPOCHS = 9


def _args(**kw):
    base = dict(quick=False, overrides=[], seed=0, epochs=EPOCHS, trials=6, concurrent=2, grace=1, reduction=3.0)
    return argparse.Namespace(**{**base, **kw})


def _record(cfg, name, aurocs, acc=1.0):
    d = stages.stage_dir(replace(cfg, name=name), "student")
    history = [{"val/id_accuracy": acc, "val/ood_auroc": a, "epoch": i + 1, "epoch_seconds": 1.0}
               for i, a in enumerate(aurocs)]
    write_json({"stage": "student", "fingerprint": "x", "outputs": {}, "history": history}, d / stages.MANIFEST)


def _trials(cfg, curves):
    _record(jtune.baseline_config(cfg), jtune.baseline_config(cfg).name, [0.5] * EPOCHS)
    names = []
    for i, curve in enumerate(curves):
        names.append(f"t{i}")
        _record(cfg, f"{cfg.name}-trial-t{i}", curve)
    return names


def test_no_stopping_before_max_t_is_fifo(tmp_path):
    cfg = tb.arm_config(tmp_path, "asha", _args(grace=EPOCHS))
    names = _trials(cfg, [[0.6 + 0.01 * i] * EPOCHS for i in range(6)])
    r = tb.replay(cfg, names, orders=20, seed=0)
    assert r["fraction_mean"] == 1.0 and r["gap_mean"] == 0.0 and r["p_goal"] == 0.0  # all epochs: over 35%


def test_ranked_curves_keep_the_best_and_save_epochs(tmp_path):
    """Curves that never cross: whatever the order, the best trial is never stopped (it beats every cutoff),
    and trials below the cutoffs stop early."""
    cfg = tb.arm_config(tmp_path, "asha", _args())
    names = _trials(cfg, [[0.5 + 0.05 * i + 0.001 * e for e in range(EPOCHS)] for i in range(6)])
    r = tb.replay(cfg, names, orders=50, seed=0)
    assert r["p_auroc"] == 1.0 and r["gap_mean"] == 0.0
    assert r["fraction_p90"] < 1.0 and r["fraction_mean"] < 0.8
    # the ID-accuracy constraint: a best AUROC bought with ID accuracy does not count
    _record(cfg, f"{cfg.name}-trial-t5", [0.99] * EPOCHS, acc=0.5)
    r = tb.replay(cfg, names, orders=5, seed=0)
    assert r["fifo_best"] == pytest.approx(0.5 + 0.05 * 4 + 0.001 * (EPOCHS - 1))  # t4's last epoch: t5 lost
    assert r["gap_mean"] == 0.0


def test_missing_history_is_one_clear_error(tmp_path):
    cfg = tb.arm_config(tmp_path, "asha", _args())
    names = _trials(cfg, [[0.6] * (EPOCHS - 2)])
    with pytest.raises(SystemExit, match="trial t0 .* has no full history"):
        tb.replay(cfg, names, orders=1, seed=0)


def test_subsets_compare_against_their_own_fifo_best(tmp_path):
    cfg = tb.arm_config(tmp_path, "asha", _args())
    names = _trials(cfg, [[0.5 + 0.05 * i + 0.001 * e for e in range(EPOCHS)] for i in range(6)])
    r = tb.replay(cfg, names, orders=40, seed=0, subset=3)
    assert r["trials"] == 3 and r["gap_mean"] == 0.0  # never-crossing curves: the subset's best always survives
    assert r["fifo_best"] <= 0.5 + 0.05 * 5 + 0.001 * (EPOCHS - 1)
    with pytest.raises(SystemExit, match="--replay-trials is 7; expected 1 to the 6 trials"):
        tb.replay(cfg, names, orders=1, seed=0, subset=7)
