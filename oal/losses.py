"""OAL's loss terms: knowledge distillation (logit and feature, with the DT projector) and MICL,
the CLUB mutual-information upper bound (Cheng et al., ICML 2020) between outliers and ID features.

    loss = CE + w_logit_kd * KD(logits) + w_feat_kd * KD(DT(teacher feat), student feat)
              + w_micl_knn * CLUB(knn outliers -> student feat)
              + w_micl_lat * DEEP_CLUB(latent outliers -> student feat)
              + w_energy_knn * ENERGY(knn outliers, student feat) + w_energy_lat * ENERGY(latent outliers, ...)

The two energy terms are the reference's `energy_rl` variant (its scripts use them instead of the CLUB pair).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from oal.config import LossConfig


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)), batch mean, scaled by T^2 (Hinton et al.)."""
    log_p = F.log_softmax(student / temperature, dim=-1)  # (B, K)
    q = F.softmax(teacher / temperature, dim=-1)  # (B, K)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


class DTProjector(nn.Module):
    """Teacher features -> student feature width: BatchNorm -> Linear -> ReLU -> BatchNorm."""

    def __init__(self, teacher_dim: int, student_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm1d(teacher_dim), nn.Linear(teacher_dim, student_dim), nn.ReLU(),
                                 nn.BatchNorm1d(student_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(t)  # (B, student_dim)


def club_estimate(mu: torch.Tensor, logvar: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CLUB's upper bound from q(y|x) = N(mu(x), exp(logvar(x))), all (B, D):

        mean_i [ sum_d -(mu_i - y_i)^2 / (2 var_i)  -  sum_d mean_j -(mu_i - y_j)^2 / (2 var_i) ]

    The mean over j of (mu_i - y_j)^2 equals (mu_i - mean(y))^2 + var(y) (population variance), so the
    B x B pair matrix is never built.
    """
    inv2var = 0.5 / logvar.exp()  # (B, D)
    positive = -((mu - y) ** 2) * inv2var  # (B, D)
    pair_mean = (mu - y.mean(0, keepdim=True)) ** 2 + y.var(0, unbiased=False, keepdim=True)  # (B, D)
    negative = -pair_mean * inv2var  # (B, D)
    return (positive.sum(-1) - negative.sum(-1)).mean()


class CLUB(nn.Module):
    """Variational q(y|x): a mean network and a Tanh-bounded log-variance network (hidden 256)."""

    def __init__(self, x_dim: int, y_dim: int, hidden: int = 256, mu_net: nn.Module | None = None):
        super().__init__()
        self.mu = mu_net or nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim))
        self.logvar = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, y_dim), nn.Tanh())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(x), self.logvar(x)  # (B, y_dim) each

    def estimate(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, logvar = self(x)
        return club_estimate(mu, logvar, y)

    def learning_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CLUB's own objective for q: the negative log-likelihood of y under q(y|x) (up to constants)."""
        mu, logvar = self(x)
        return ((mu - y) ** 2 / logvar.exp() + logvar).sum(-1).mean()


def deep_club(x_dim: int, y_dim: int) -> CLUB:
    """CLUB for the 64-d latent outliers: a deeper mean network x_dim -> 32 -> 16 -> 256 -> y_dim."""
    mu = nn.Sequential(nn.Linear(x_dim, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 256), nn.ReLU(),
                       nn.Linear(256, y_dim))
    return CLUB(x_dim, y_dim, mu_net=mu)


class EnergyRegularizer(nn.Module):
    """The reference's energy_rl term for one outlier set: the outliers are projected to the student's feature
    width by their own DT projector; the energy (logsumexp over the feature dimension) of each ID feature and of
    each projected outlier is classified ID vs outlier by a 1 -> 2 logistic regression, trained with
    cross-entropy (label 1 = ID, 0 = outlier). Minimising it makes the two energies separable."""

    def __init__(self, outlier_dim: int, student_dim: int):
        super().__init__()
        self.dt = DTProjector(outlier_dim, student_dim)
        self.logistic = nn.Linear(1, 2)

    def forward(self, feat: torch.Tensor, outliers: torch.Tensor) -> torch.Tensor:
        e_id = torch.logsumexp(feat, dim=-1)  # (B,)
        e_out = torch.logsumexp(self.dt(outliers), dim=-1)  # (M,)
        energy = torch.cat([e_id, e_out]).unsqueeze(1)  # (B + M, 1)
        labels = torch.cat([torch.ones(len(e_id)), torch.zeros(len(e_out))]).long().to(feat.device)  # (B + M,)
        return F.cross_entropy(self.logistic(energy), labels)


@dataclass
class LossOutput:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]  # unweighted value of each active term, by name


class OALLoss(nn.Module):
    """The OAL objective. Only the terms with a positive weight are built and computed (ablations)."""

    def __init__(self, cfg: LossConfig, student_dim: int, teacher_dim: int | None = None,
                 knn_dim: int | None = None, latent_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.use_logit_kd = cfg.w_logit_kd > 0
        self.use_feat_kd = cfg.w_feat_kd > 0
        if (self.use_logit_kd or self.use_feat_kd) and teacher_dim is None:
            raise ValueError("loss.w_logit_kd / loss.w_feat_kd > 0 need a teacher checkpoint; set both to 0 "
                             "to train without one")
        for w, dim, key, name in ((cfg.w_micl_knn, knn_dim, "knn_path", "w_micl_knn"),
                                  (cfg.w_micl_lat, latent_dim, "latent_path", "w_micl_lat"),
                                  (cfg.w_energy_knn, knn_dim, "knn_path", "w_energy_knn"),
                                  (cfg.w_energy_lat, latent_dim, "latent_path", "w_energy_lat")):
            if w > 0 and dim is None:
                raise ValueError(f"loss.{name} > 0 needs outliers.{key}; give the file or set loss.{name}=0")
        self.dt = DTProjector(teacher_dim, student_dim) if self.use_feat_kd and teacher_dim else None
        self.club_knn = CLUB(knn_dim, student_dim) if cfg.w_micl_knn > 0 and knn_dim else None
        self.club_lat = deep_club(latent_dim, student_dim) if cfg.w_micl_lat > 0 and latent_dim else None
        self.energy_knn = EnergyRegularizer(knn_dim, student_dim) if cfg.w_energy_knn > 0 and knn_dim else None
        self.energy_lat = EnergyRegularizer(latent_dim, student_dim) if cfg.w_energy_lat > 0 and latent_dim else None

    def _micl(self, club: CLUB, x: torch.Tensor, y: torch.Tensor, terms: dict, name: str) -> torch.Tensor:
        n = min(len(x), len(y))
        x, y = x[:n], y[:n]
        if self.cfg.club_training == "reference":
            # The reference trains q on the same minimised objective as the student.
            return club.estimate(x, y)
        # CLUB's own scheme: q fits log q(y|x) on detached features; the estimate only moves the student.
        terms[f"{name}_q_nll"] = club.learning_loss(x, y.detach())
        with torch.no_grad():
            mu, logvar = club(x)
        return club_estimate(mu, logvar, y)

    def forward(self, logits: torch.Tensor, feat: torch.Tensor, labels: torch.Tensor,
                t_logits: torch.Tensor | None = None, t_feat: torch.Tensor | None = None,
                knn: torch.Tensor | None = None, latent: torch.Tensor | None = None) -> LossOutput:
        c = self.cfg
        terms: dict[str, torch.Tensor] = {"ce": F.cross_entropy(logits, labels)}
        total = terms["ce"]
        if self.use_logit_kd:
            assert t_logits is not None
            terms["logit_kd"] = kd_loss(logits, t_logits, c.kd_temperature)
            total = total + c.w_logit_kd * terms["logit_kd"]
        if self.dt is not None:
            assert t_feat is not None
            terms["feat_kd"] = kd_loss(feat, self.dt(t_feat), c.kd_temperature)
            total = total + c.w_feat_kd * terms["feat_kd"]
        if self.club_knn is not None and knn is not None:
            terms["micl_knn"] = self._micl(self.club_knn, knn, feat, terms, "micl_knn")
            total = total + c.w_micl_knn * terms["micl_knn"]
        if self.club_lat is not None and latent is not None:
            terms["micl_lat"] = self._micl(self.club_lat, latent, feat, terms, "micl_lat")
            total = total + c.w_micl_lat * terms["micl_lat"]
        if self.energy_knn is not None and knn is not None:
            terms["energy_knn"] = self.energy_knn(feat, knn)
            total = total + c.w_energy_knn * terms["energy_knn"]
        if self.energy_lat is not None and latent is not None:
            terms["energy_lat"] = self.energy_lat(feat, latent)
            total = total + c.w_energy_lat * terms["energy_lat"]
        for k, v in terms.items():
            if k.endswith("_q_nll"):
                total = total + v
        return LossOutput(total=total, terms=terms)
