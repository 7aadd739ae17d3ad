import math

import pytest
import torch

from oal.config import LossConfig
from oal.losses import (
    CLUB,
    DTProjector,
    EnergyRegularizer,
    LogitEnergyRegularizer,
    OALLoss,
    club_estimate,
    deep_club,
    kd_loss,
    oe_loss,
)


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


def test_kd_temperature_divides_both_sides():
    s, t = torch.tensor([[1.0, -1.0, 0.5]]), torch.tensor([[0.0, 2.0, 1.0]])
    for temp in (0.5, 2.0, 3.0):
        p, q = torch.softmax(s / temp, -1), torch.softmax(t / temp, -1)
        expected = temp**2 * float((q * (q / p).log()).sum())
        assert kd_loss(s, t, temp).item() == pytest.approx(expected, rel=1e-5), temp
    # batch mean over rows, each row its own softmax
    two = torch.cat([s, t]), torch.cat([t, s])
    assert kd_loss(*two).item() == pytest.approx((kd_loss(s, t) + kd_loss(t, s)).item() / 2, rel=1e-6)


def test_club_default_networks():
    club = CLUB(3, 5)
    kinds = lambda seq: [type(m).__name__ for m in seq]  # noqa: E731
    assert kinds(club.mu) == ["Linear", "ReLU", "Linear"] and kinds(club.logvar) == ["Linear", "ReLU", "Linear", "Tanh"]
    assert [(m.in_features, m.out_features) for m in club.mu if isinstance(m, torch.nn.Linear)] == [(3, 256), (256, 5)]
    assert [(m.in_features, m.out_features) for m in club.logvar if isinstance(m, torch.nn.Linear)] == [(3, 256), (256, 5)]
    deep = deep_club(64, 512)
    assert kinds(deep.mu) == ["Linear", "ReLU", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert kinds(deep.logvar) == ["Linear", "ReLU", "Linear", "Tanh"] and deep.logvar[0].in_features == 64


def test_energy_regularizer_by_hand():
    torch.manual_seed(0)
    reg = EnergyRegularizer(outlier_dim=5, student_dim=4)
    assert reg.dt.net[1].in_features == 5 and reg.dt.net[1].out_features == 4
    assert (reg.logistic.in_features, reg.logistic.out_features) == (1, 2)
    feat, out = torch.randn(6, 4), torch.randn(3, 5)
    got = reg(feat, out)
    proj = reg.dt(out)  # (3, 4): BatchNorm in training mode on this batch, the same as inside forward
    e = torch.cat([torch.logsumexp(feat, 1), torch.logsumexp(proj, 1)])  # (9,)
    logits = e[:, None] * reg.logistic.weight[:, 0] + reg.logistic.bias  # (9, 2)
    labels = torch.tensor([1] * 6 + [0] * 3)
    expected = -(torch.log_softmax(logits, 1)[torch.arange(9), labels]).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_logit_energy_regularizer_by_hand():
    torch.manual_seed(0)
    reg = LogitEnergyRegularizer(outlier_dim=5, student_dim=4)
    assert F_softplus(reg.raw_slope) == pytest.approx(1.0) and reg.bias.item() == 0.0  # slope 1, bias 0 at the start
    assert reg.logistic(torch.tensor([2.0, -1.0])).tolist() == pytest.approx([2.0, -1.0])
    with torch.no_grad():
        reg.raw_slope.fill_(0.3)
        reg.bias.fill_(-0.5)
    slope = math.log1p(math.exp(0.3))
    assert reg.logistic(torch.tensor([2.0])).item() == pytest.approx(slope * 2 - 0.5)
    head = torch.nn.Linear(4, 3)
    id_logits, out = torch.randn(6, 3), torch.randn(2, 5)
    got = reg(id_logits, out, head)
    s = torch.cat([torch.logsumexp(id_logits, 1), torch.logsumexp(head(reg.dt(out)), 1)])  # (8,)
    z = slope * s - 0.5
    y = torch.tensor([1.0] * 6 + [0.0] * 2)
    expected = -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # lowering the loss raises the ID samples' energy score and lowers the outliers'
    id_logits.requires_grad_(True)
    reg(id_logits, out, head).backward()
    assert (id_logits.grad.sum(1) < 0).all()


def F_softplus(x: torch.Tensor) -> float:
    return float(torch.nn.functional.softplus(x.detach()))


def test_oe_loss_by_hand():
    assert oe_loss(torch.zeros(2, 4)).item() == pytest.approx(math.log(4))  # uniform: log K, its minimum
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    expected = ((math.log(4.0) - math.log(3.0) / 2) + math.log(2.0)) / 2  # lse - mean, batch mean
    assert oe_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def _all_terms_inputs(b=8, k=3, ds=6, dt=10):
    inp = _inputs(b, k, ds, dt)
    g = torch.Generator().manual_seed(2)
    inp.update(head=torch.nn.Linear(ds, k), pixel_logits=torch.randn(5, k, generator=g))
    return inp


def test_every_term_weighted_into_the_total():
    w = dict(w_logit_kd=0.3, w_feat_kd=0.7, w_micl_knn=0.11, w_micl_lat=0.13, w_energy_knn=0.17, w_energy_lat=0.19,
             w_logit_energy_knn=0.23, w_logit_energy_lat=0.29, w_pixel_oe=0.31)
    torch.manual_seed(0)
    loss = OALLoss(LossConfig(**w, kd_temperature=2.0), student_dim=6, teacher_dim=10, knn_dim=10, latent_dim=4)
    inp = _all_terms_inputs()
    out = loss(**inp)
    t = out.terms
    names = {k[2:]: v for k, v in w.items()}
    assert set(t) == {"ce", *names}
    expected = t["ce"] + sum(v * t[name] for name, v in names.items())
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
    # each term's value, from its own function on the same inputs
    assert t["ce"].item() == pytest.approx(torch.nn.functional.cross_entropy(inp["logits"], inp["labels"]).item())
    assert t["logit_kd"].item() == pytest.approx(kd_loss(inp["logits"], inp["t_logits"], 2.0).item(), rel=1e-6)
    with torch.no_grad():  # the DT projector in training mode normalises by this batch: the same output again
        assert t["feat_kd"].item() == pytest.approx(kd_loss(inp["feat"], loss.dt(inp["t_feat"]), 2.0).item(), rel=1e-5)
        assert t["feat_kd"].item() != pytest.approx(kd_loss(inp["feat"], loss.dt(inp["t_feat"]), 1.0).item(), rel=1e-3)
    assert t["pixel_oe"].item() == pytest.approx(oe_loss(inp["pixel_logits"]).item(), rel=1e-6)
    assert t["micl_knn"].item() == pytest.approx(loss.club_knn.estimate(inp["knn"], inp["feat"]).item(), rel=1e-5)
    assert t["micl_lat"].item() == pytest.approx(loss.club_lat.estimate(inp["latent"], inp["feat"]).item(), rel=1e-5)
    # the DT projector, the CLUBs and the regularisers are built at the given widths
    assert (loss.dt.net[1].in_features, loss.dt.net[1].out_features) == (10, 6)
    assert loss.club_knn.mu[0].in_features == 10 and loss.club_knn.mu[-1].out_features == 6
    assert loss.club_lat.mu[0].in_features == 4 and [m.out_features for m in loss.club_lat.mu
                                                       if isinstance(m, torch.nn.Linear)] == [32, 16, 256, 6]
    for reg, dim in ((loss.energy_knn, 10), (loss.energy_lat, 4), (loss.logit_energy_knn, 10),
                     (loss.logit_energy_lat, 4)):
        assert (reg.dt.net[1].in_features, reg.dt.net[1].out_features) == (dim, 6)
    assert isinstance(loss.energy_knn, EnergyRegularizer) and isinstance(loss.logit_energy_lat, LogitEnergyRegularizer)
    # every term moves the student's features or logits
    out.total.backward()
    assert inp["feat"].grad is not None and inp["feat"].grad.abs().sum() > 0
    assert inp["head"].weight.grad is not None  # the logit-energy terms go through the student's head


@pytest.mark.parametrize("term", ["w_logit_kd", "w_feat_kd", "w_micl_knn", "w_micl_lat", "w_energy_knn", "w_energy_lat",
                                  "w_logit_energy_knn", "w_logit_energy_lat", "w_pixel_oe"])
def test_each_term_alone(term):
    """A weight above 0 (small: 0.5 < 1) builds and computes its term alone; at 0 nothing of it is built."""
    zero = dict.fromkeys(("w_logit_kd", "w_feat_kd", "w_micl_knn", "w_micl_lat"), 0.0)
    cfg = LossConfig(**{**zero, term: 0.5})
    loss = OALLoss(cfg, student_dim=6, teacher_dim=10, knn_dim=10, latent_dim=4)
    out = loss(**_all_terms_inputs())
    assert set(out.terms) == {"ce", term[2:]}
    assert out.total.item() == pytest.approx((out.terms["ce"] + 0.5 * out.terms[term[2:]]).item(), rel=1e-6)
    built = {name for name in ("dt", "club_knn", "club_lat", "energy_knn", "energy_lat", "logit_energy_knn",
                               "logit_energy_lat") if getattr(loss, name) is not None}
    owner = {"w_feat_kd": {"dt"}, "w_micl_knn": {"club_knn"}, "w_micl_lat": {"club_lat"}}.get(term, {term[2:]} & {
        "energy_knn", "energy_lat", "logit_energy_knn", "logit_energy_lat"})
    assert built == owner
    assert loss.use_logit_kd == (term == "w_logit_kd") and loss.use_feat_kd == (term == "w_feat_kd")
    # without its input the term is left out (a stage without that outlier file)
    missing = {"w_logit_kd": None, "w_feat_kd": None, "w_micl_knn": "knn", "w_micl_lat": "latent",
               "w_energy_knn": "knn", "w_energy_lat": "latent", "w_logit_energy_knn": "knn",
               "w_logit_energy_lat": "latent", "w_pixel_oe": "pixel_logits"}[term]
    if missing:
        out = loss(**{**_all_terms_inputs(), missing: None})
        assert set(out.terms) == {"ce"} and out.total.item() == pytest.approx(out.terms["ce"].item())


def test_logit_energy_needs_the_head():
    for term in ("w_logit_energy_knn", "w_logit_energy_lat"):
        loss = OALLoss(LossConfig(w_logit_kd=0, w_feat_kd=0, w_micl_knn=0, w_micl_lat=0, **{term: 0.1}), student_dim=6,
                       knn_dim=10, latent_dim=4)
        with pytest.raises(ValueError, match=rf"^loss.{term} > 0 needs the student's classifier head in forward\(head=\)$"):
            loss(**{**_all_terms_inputs(), "head": None})


@pytest.mark.parametrize("term,key", [("w_micl_knn", "knn_path"), ("w_micl_lat", "latent_path"),
                                      ("w_energy_knn", "knn_path"), ("w_energy_lat", "latent_path"),
                                      ("w_logit_energy_knn", "knn_path"), ("w_logit_energy_lat", "latent_path")])
def test_each_outlier_term_names_its_missing_file(term, key):
    cfg = LossConfig(**{**dict(w_logit_kd=0, w_feat_kd=0, w_micl_knn=0, w_micl_lat=0), term: 0.5})
    with pytest.raises(ValueError, match=rf"^loss.{term} > 0 needs outliers.{key}; give the file or set loss.{term}=0$"):
        OALLoss(cfg, student_dim=6, knn_dim=None if key == "knn_path" else 10,
                latent_dim=None if key == "latent_path" else 4)
    other = dict(knn_dim=10) if key == "knn_path" else dict(latent_dim=4)
    assert getattr(OALLoss(cfg, student_dim=6, **other), term[2:].replace("micl_", "club_")) is not None


@pytest.mark.parametrize("term", ["w_logit_kd", "w_feat_kd"])
def test_kd_terms_need_a_teacher(term):
    cfg = LossConfig(**{**dict(w_logit_kd=0, w_feat_kd=0, w_micl_knn=0, w_micl_lat=0), term: 0.5})
    with pytest.raises(ValueError, match=r"^loss.w_logit_kd / loss.w_feat_kd > 0 need a teacher checkpoint; set both"
                                         r" to 0 to train without one$"):
        OALLoss(cfg, student_dim=6)


def test_micl_pairs_outliers_with_features_up_to_the_shorter_batch():
    torch.manual_seed(0)
    for mode in ("reference", "loglik"):
        loss = OALLoss(LossConfig(w_logit_kd=0, w_feat_kd=0, w_micl_lat=0, club_training=mode), student_dim=6,
                       knn_dim=10)
        inp = _inputs()
        more = torch.randn(13, 10)  # more outliers than the batch's 8 features
        out = loss(**{**inp, "knn": more})
        assert out.terms["micl_knn"].item() == pytest.approx(loss.club_knn.estimate(more[:8], inp["feat"]).item(),
                                                             rel=1e-5)
        fewer = more[:5]  # fewer: the first 5 features
        out = loss(**{**inp, "knn": fewer})
        assert out.terms["micl_knn"].item() == pytest.approx(
            loss.club_knn.estimate(fewer, inp["feat"][:5]).item(), rel=1e-5)
        if mode == "loglik":
            assert out.terms["micl_knn_q_nll"].item() == pytest.approx(
                loss.club_knn.learning_loss(fewer, inp["feat"][:5]).item(), rel=1e-5)
