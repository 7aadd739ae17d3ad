import math

import pytest
import torch

from oal.config import LossConfig
from oal.losses import CLUB, DTProjector, OALLoss, club_estimate, deep_club, kd_loss


def test_kd_by_hand():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # softmax -> (0.75, 0.25)
    # KL(q || p) with q = (0.75, 0.25), p = (0.5, 0.5)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    # T = 2: logits halved, times T^2
    q = torch.softmax(t / 2, -1)[0]
    assert kd_loss(s, t, 2.0).item() == pytest.approx(4 * float((q * (q / 0.5).log()).sum()), rel=1e-6)


def test_club_estimate_by_hand():
    # B = 2, D = 1, var = 1: positive_i = -(mu_i - y_i)^2 / 2; negative_i = -mean_j (mu_i - y_j)^2 / 2
    mu = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[0.0], [2.0]])
    logvar = torch.zeros(2, 1)
    pos = [-0.0, -0.5]
    neg = [-(0 + 4) / 4, -(1 + 1) / 4]
    expected = ((pos[0] - neg[0]) + (pos[1] - neg[1])) / 2
    assert club_estimate(mu, logvar, y).item() == pytest.approx(expected)


def test_club_estimate_matches_explicit_pairs():
    g = torch.Generator().manual_seed(0)
    mu, logvar, y = (torch.randn(7, 5, generator=g) for _ in range(3))
    var = logvar.exp()
    pos = (-(mu - y) ** 2 / (2 * var)).sum(-1)  # (B,)
    pairs = (mu.unsqueeze(1) - y.unsqueeze(0)) ** 2  # (B_i, B_j, D)
    neg = (-pairs.mean(1) / (2 * var)).sum(-1)  # (B,)
    assert club_estimate(mu, logvar, y).item() == pytest.approx((pos - neg).mean().item(), rel=1e-5)


def test_club_learning_loss_by_hand():
    club = CLUB(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    mu, logvar = club(x)
    assert (logvar.abs() <= 1).all()  # Tanh-bounded
    expected = ((mu - y) ** 2 / logvar.exp() + logvar).sum(-1).mean()
    assert club.learning_loss(x, y).item() == pytest.approx(expected.item())


def test_deep_club_shape_and_layers():
    club = deep_club(64, 512)
    widths = [m.out_features for m in club.mu if isinstance(m, torch.nn.Linear)]
    assert widths == [32, 16, 256, 512]
    mu, logvar = club(torch.randn(3, 64))
    assert mu.shape == logvar.shape == (3, 512)


def test_dt_projector():
    dt = DTProjector(768, 512)
    kinds = [type(m).__name__ for m in dt.net]
    assert kinds == ["BatchNorm1d", "Linear", "ReLU", "BatchNorm1d"]
    assert dt(torch.randn(4, 768)).shape == (4, 512)


def _inputs(b=8, k=3, ds=6, dt=10):
    g = torch.Generator().manual_seed(1)
    return dict(logits=torch.randn(b, k, generator=g), feat=torch.randn(b, ds, generator=g, requires_grad=True),
                labels=torch.randint(0, k, (b,), generator=g), t_logits=torch.randn(b, k, generator=g),
                t_feat=torch.randn(b, dt, generator=g), knn=torch.randn(b, dt, generator=g),
                latent=torch.randn(b, 4, generator=g))


def test_oal_loss_total_is_weighted_sum():
    cfg = LossConfig(w_logit_kd=4, w_feat_kd=8, w_micl_knn=0.1, w_micl_lat=0.2)
    loss = OALLoss(cfg, student_dim=6, teacher_dim=10, knn_dim=10, latent_dim=4)
    out = loss(**_inputs())
    t = out.terms
    assert set(t) == {"ce", "logit_kd", "feat_kd", "micl_knn", "micl_lat"}
    expected = t["ce"] + 4 * t["logit_kd"] + 8 * t["feat_kd"] + 0.1 * t["micl_knn"] + 0.2 * t["micl_lat"]
    assert out.total.item() == pytest.approx(expected.item())


def test_ablation_switches_terms_off():
    loss = OALLoss(LossConfig(w_logit_kd=0, w_feat_kd=0, w_micl_knn=0, w_micl_lat=0), student_dim=6)
    out = loss(**_inputs())
    assert set(out.terms) == {"ce"} and loss.dt is None and loss.club_knn is None and loss.club_lat is None
    assert sum(p.numel() for p in loss.parameters()) == 0


def test_missing_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="teacher"):
        OALLoss(LossConfig(w_micl_knn=0, w_micl_lat=0), student_dim=6)
    with pytest.raises(ValueError, match="outliers.knn_path"):
        OALLoss(LossConfig(w_logit_kd=0, w_feat_kd=0, w_micl_lat=0), student_dim=6)
    with pytest.raises(ValueError, match="outliers.latent_path"):
        OALLoss(LossConfig(w_logit_kd=0, w_feat_kd=0, w_micl_knn=0), student_dim=6)


def test_club_training_modes():
    inp = _inputs()
    ref = OALLoss(LossConfig(w_logit_kd=0, w_feat_kd=0, w_micl_lat=0), student_dim=6, knn_dim=10)
    ref(**inp).terms["micl_knn"].backward()
    assert ref.club_knn.mu[0].weight.grad is not None  # reference: q is trained on the minimised objective

    ll = OALLoss(LossConfig(w_logit_kd=0, w_feat_kd=0, w_micl_lat=0, club_training="loglik"), student_dim=6,
                 knn_dim=10)
    inp = _inputs()
    out = ll(**inp)
    assert "micl_knn_q_nll" in out.terms
    out.terms["micl_knn"].backward()
    # loglik: the MI estimate moves the student's features only, never q
    assert ll.club_knn.mu[0].weight.grad is None and inp["feat"].grad is not None
    ll.zero_grad()
    inp["feat"].grad = None
    out = ll(**inp)
    out.terms["micl_knn_q_nll"].backward()
    assert ll.club_knn.mu[0].weight.grad is not None and inp["feat"].grad is None  # q's fit is on detached y


def test_loglik_total_adds_each_q_fit_unweighted():
    """club_training=loglik: q's own fit (the negative log-likelihood of the features under q(y|x)) is in the
    total at weight 1 beside the weighted MI estimates, so that one backward trains q too."""
    cfg = LossConfig(w_logit_kd=0, w_feat_kd=0, w_micl_knn=0.1, w_micl_lat=0.2, club_training="loglik")
    loss = OALLoss(cfg, student_dim=6, knn_dim=10, latent_dim=4)
    inp = _inputs()
    out = loss(**inp)
    t = out.terms
    assert set(t) == {"ce", "micl_knn", "micl_lat", "micl_knn_q_nll", "micl_lat_q_nll"}
    assert t["micl_knn_q_nll"].item() == pytest.approx(loss.club_knn.learning_loss(inp["knn"], inp["feat"]).item())
    assert t["micl_lat_q_nll"].item() == pytest.approx(loss.club_lat.learning_loss(inp["latent"], inp["feat"]).item())
    mu, logvar = loss.club_knn(inp["knn"])
    assert t["micl_knn"].item() == pytest.approx(club_estimate(mu, logvar, inp["feat"]).item())
    expected = (t["ce"] + 0.1 * t["micl_knn"] + 0.2 * t["micl_lat"] + t["micl_knn_q_nll"] + t["micl_lat_q_nll"])
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(t["micl_knn_q_nll"].item()) > 1e-3  # not a vanishing term the check above could miss
    out.total.backward()
    assert loss.club_knn.mu[0].weight.grad.abs().sum() > 0 and loss.club_lat.logvar[0].weight.grad.abs().sum() > 0
    # reference: no separate fit; q is trained through the estimate itself
    ref = OALLoss(LossConfig(w_logit_kd=0, w_feat_kd=0, w_micl_knn=0.1, w_micl_lat=0.2), student_dim=6, knn_dim=10,
                  latent_dim=4)
    r = ref(**_inputs())
    assert set(r.terms) == {"ce", "micl_knn", "micl_lat"}
    assert r.total.item() == pytest.approx((r.terms["ce"] + 0.1 * r.terms["micl_knn"] + 0.2 * r.terms["micl_lat"]).item())
