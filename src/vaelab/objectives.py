"""Training objectives. Each returns the loss to minimize and the per-example terms to log.

All terms are in nats per example (summed over the dimensions of one example), so
``elbo = recon − kl`` holds exactly for the logged numbers, and they compare with the tables
of the VAE papers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from vaelab.precision import upcast
from vaelab.vae import VAE, float32, kl_or_monte_carlo, rsample_and_log_prob


@dataclass
class ObjectiveOutput:
    """``loss``: the scalar to minimize. ``terms``: per-example tensors ``[B]`` (nats).
    ``scalars``: settings worth logging (β, ...). ``analytic_kl``: how the KL was computed."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    scalars: dict[str, float] = field(default_factory=dict)
    analytic_kl: bool = True


def per_dimension_kl(q: Distribution, p: Distribution) -> torch.Tensor | None:
    """KL(q_d ‖ p_d) per latent dimension ``[*batch, Z]`` where both q and p factorize over
    the dimensions as ``Independent(Normal, 1)`` (diagonal Gaussian posterior vs standard or
    learned diagonal prior); ``None`` where the KL does not split into per-dimension terms."""
    if all(
        isinstance(d, Independent) and type(d.base_dist) is Normal and d.reinterpreted_batch_ndims == 1
        for d in (q, p)
    ):
        return kl_divergence(q.base_dist, p.base_dist)
    return None


class Objective(nn.Module):
    """Base class: the KL weight β, its warm-up, and free bits, shared by every objective.

    * ``beta``: the target KL weight (1: the true bound; > 1: β-VAE, Higgins et al. 2017).
    * ``warmup`` (≥ 0), ``warmup_unit`` (``steps`` | ``epochs``): KL warm-up (Bowman et al. 2016;
      Sønderby et al. 2016): the effective β rises linearly from 0 to ``beta`` over ``warmup``
      optimizer steps (``trainer.global_step``) or epochs (``trainer.current_epoch``; then β
      is constant within an epoch: β_e = beta · min(1, e / warmup)). ``warmup=0``: no warm-up.
    * ``free_bits`` λ ≥ 0 (nats per latent dimension; Kingma et al. 2016, "Improved Variational
      Inference with Inverse Autoregressive Flow", eq. 15): the KL in the loss becomes
      Σ_d max(λ, KL_d), KL_d the batch mean of the per-dimension KL, so dimensions below λ
      nats feel no KL pressure. The per-dimension KL is analytic when q and p are both
      diagonal Gaussians (``Independent(Normal)``); for any other pair (full covariance, IAF,
      mixture priors: a Monte Carlo or non-factorizing KL) free bits apply to the total:
      max(λ·Z, KL̄). ``free_bits=0``: the plain loss, unchanged.

    The objective is called as ``objective(vae, x, step=..., epoch=...)``; with no step/epoch
    (validation, test, plain use) the warm-up counts as finished, β = ``beta``. Warm-up and
    free bits change only ``loss``: the logged per-example terms are always the true bounds
    (β = 1, no free bits), and ``scalars["beta"]`` is the effective β of this call.
    """

    def __init__(
        self,
        num_samples: int = 1,
        beta: float = 1.0,
        warmup: int = 0,
        warmup_unit: str = "steps",
        free_bits: float = 0.0,
    ):
        super().__init__()
        if int(num_samples) < 1:
            raise ValueError(f"objective.num_samples must be >= 1, got {num_samples}")
        if not float(beta) >= 0:
            raise ValueError(f"objective.beta must be >= 0, got {beta}")
        if isinstance(warmup, bool) or int(warmup) != warmup or int(warmup) < 0:
            raise ValueError(f"objective.warmup must be an integer >= 0, got {warmup!r}")
        if warmup_unit not in ("steps", "epochs"):
            raise ValueError(f"objective.warmup_unit must be 'steps' or 'epochs', got {warmup_unit!r}")
        if not float(free_bits) >= 0:
            raise ValueError(f"objective.free_bits must be >= 0, got {free_bits}")
        self.num_samples = int(num_samples)
        self.beta = float(beta)
        self.warmup = int(warmup)
        self.warmup_unit = warmup_unit
        self.free_bits = float(free_bits)

    def effective_beta(self, step: int | None = None, epoch: int | None = None) -> float:
        """β at this optimizer step / epoch: ``beta · min(1, t / warmup)``."""
        t = step if self.warmup_unit == "steps" else epoch
        if self.warmup == 0 or t is None:
            return self.beta
        return self.beta * min(1.0, max(int(t), 0) / self.warmup)

    def kl_in_loss(self, q: Distribution, p: Distribution, kl: torch.Tensor) -> torch.Tensor:
        """The batch's KL as it enters the loss (before β): mean_x KL, or with free bits
        Σ_d max(λ, KL̄_d) (per dimension where defined, else max(λ·Z, KL̄) on the total)."""
        if self.free_bits == 0:
            return kl.mean()
        per_dim = per_dimension_kl(q, p)
        if per_dim is not None:
            per_dim = per_dim.reshape(-1, per_dim.shape[-1]).mean(0)
            return torch.clamp(per_dim, min=self.free_bits).sum()
        return torch.clamp(kl.mean(), min=self.free_bits * q.event_shape[-1])

    def forward(
        self, vae: VAE, x: torch.Tensor, step: int | None = None, epoch: int | None = None
    ) -> ObjectiveOutput:
        raise NotImplementedError


class ELBO(Objective):
    """The evidence lower bound, with S reparameterized samples and a KL weight β:

        ELBO(x) = E_q(z|x)[log p(x|z)] − KL(q(z|x) ‖ p(z))
        loss    = −mean_x E_q[log p(x|z)] + β · mean_x KL

    β = 1 is the VAE of Kingma & Welling (2014); β > 1 the β-VAE of Higgins et al. (2017).
    With warm-up β is the effective β of the step, with free bits mean_x KL becomes
    Σ_d max(λ, KL̄_d) (see ``Objective``). Whatever β, the logged ``elbo`` is the true bound
    (β = 1); ``loss`` is what is minimized. The KL is analytic where torch.distributions
    registers the pair (q, p), else Monte Carlo on the same samples (with log q from
    ``rsample_and_log_prob`` where q provides it, e.g. IAF).
    """

    def forward(
        self, vae: VAE, x: torch.Tensor, step: int | None = None, epoch: int | None = None
    ) -> ObjectiveOutput:
        beta = self.effective_beta(step, epoch)
        q = vae.encode(x)
        with float32(x.device):  # a flow's networks run here, as sampling: keep its log-det in fp32
            z, log_q = rsample_and_log_prob(q, (self.num_samples,))  # [S, B, Z], [S, B] or None
        px = vae.decode(z)  # batch shape [S, B]
        with float32(x.device):
            p = vae.prior_distribution()
            log_px = px.log_prob(x)  # [S, B]
            # E_q[log p(x|z)]  [B]: the mean over the S samples (with S = 1 that sample itself,
            # a view: the same numbers without a reduction; squeeze rather than [0], whose
            # backward fills a zero tensor and copies into it, two more operations a step)
            recon = log_px.squeeze(0) if self.num_samples == 1 else log_px.mean(0)
            kl, analytic = kl_or_monte_carlo(q, p, upcast(z), log_q)
            elbo = recon - kl
            if self.free_bits == 0:
                # −(recon − β·kl); for β = 1 written kl − recon, which is the same floating-point
                # number (negation and multiplying by 1 are exact) in two operations fewer
                loss = (kl - recon).mean() if beta == 1.0 else -(recon - beta * kl).mean()
            else:
                loss = -recon.mean() + beta * self.kl_in_loss(q, p, kl)
        return ObjectiveOutput(
            loss=loss,
            terms={"elbo": elbo, "recon": recon, "kl": kl},
            scalars={"beta": beta},
            analytic_kl=analytic,
        )


class IWAE(Objective):
    """The importance-weighted bound IWAE_K (Burda, Grosse & Salakhutdinov 2016, "Importance
    Weighted Autoencoders", ICLR; arXiv 2015):

        IWAE_K(x) = log 1/K Σ_k w_k,   w_k = p(x|z_k) p(z_k) / q(z_k|x),   z_k ~ q(z|x)
        loss      = −mean_x IWAE_K^β(x)

    with log w_k^β = log p(x|z_k) + β [log p(z_k) − log q(z_k|x)]: β (and its warm-up) weighs
    the prior-to-posterior log ratio inside every weight; β = 1 gives IWAE_K itself, and for
    K = 1 the loss is the β-weighted ELBO with a Monte Carlo KL. Free bits λ > 0 add
    β · Σ_d max(0, λ − KL̄_d) (or β · max(0, λZ − KL̄) where the KL does not split per dimension):
    for K = 1 the expected gradient is then exactly the free-bits ELBO's; for K > 1 it is the
    same heuristic (it cancels an ELBO-sized KL pull on the dimensions below λ nats).
    Gradients are the plain reparameterized IWAE gradients (no DReG / STL estimator).

    Logged per-example terms (true bounds, β = 1): ``iwae`` = IWAE_K; ``recon`` = mean_k
    log p(x|z_k); ``kl`` = KL(q ‖ p), analytic where torch registers (q, p) (lower variance,
    no extra cost), else mean_k[log q(z_k|x) − log p(z_k)] on the same K samples; and
    ``elbo = recon − kl``, an ELBO estimate from the K samples (with a Monte Carlo KL it is
    exactly mean_k log w_k). ``iwae ≥ elbo`` in expectation.
    """

    #: per-example terms beyond elbo/recon/kl that this objective returns (logged as train/<term>)
    extra_terms = ("iwae",)

    def __init__(self, num_samples: int = 5, **settings: float | int | str):
        super().__init__(num_samples=num_samples, **settings)  # K = 5 unless given

    def forward(
        self, vae: VAE, x: torch.Tensor, step: int | None = None, epoch: int | None = None
    ) -> ObjectiveOutput:
        beta = self.effective_beta(step, epoch)
        k = self.num_samples
        q = vae.encode(x)
        with float32(x.device):  # as in ELBO: a flow's log-det in fp32
            z, log_q = rsample_and_log_prob(q, (k,))  # [K, B, Z]
        px = vae.decode(z)  # batch shape [K, B]
        with float32(x.device):
            z = upcast(z)
            log_q = q.log_prob(z) if log_q is None else upcast(log_q)
            p = vae.prior_distribution()
            log_px_z = px.log_prob(x)  # [K, B]
            log_ratio = p.log_prob(z) - log_q  # log p(z_k) − log q(z_k|x)  [K, B]
            iwae = torch.logsumexp(log_px_z + log_ratio, dim=0) - math.log(k)
            recon = log_px_z.mean(0)
            kl, analytic = kl_or_monte_carlo(q, p, z, log_q)
            elbo = recon - kl
            bound = iwae if beta == 1.0 else torch.logsumexp(log_px_z + beta * log_ratio, 0) - math.log(k)
            loss = -bound.mean()
            if self.free_bits > 0:
                loss = loss + beta * (self.kl_in_loss(q, p, kl) - kl.mean())
        return ObjectiveOutput(
            loss=loss,
            terms={"elbo": elbo, "iwae": iwae, "recon": recon, "kl": kl},
            scalars={"beta": beta},
            analytic_kl=analytic,
        )
