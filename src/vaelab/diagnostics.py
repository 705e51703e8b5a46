"""Posterior diagnostics on the test split: the KL per latent dimension and active units.

* **KL per dimension.** When q(z|x) and p(z) both factorize over the latent dimensions
  (diagonal Gaussian posterior, standard or learned diagonal Gaussian prior), the KL term of
  the ELBO is a sum over dimensions, KL(q(z|x) ‖ p(z)) = Σ_u KL(q(z_u|x) ‖ p(z_u)), and each
  term, averaged over the test set, says how many nats the model spends on dimension u.
  A dimension with KL ≈ 0 carries no information about x: its posterior is the prior.
* **Active units** (Burda et al. 2015, "Importance Weighted Autoencoders", §5.2): dimension u is
  active when A_u = Cov_x(E_{q(z|x)}[z_u]) > 0.01, i.e. when the posterior mean moves with x.
  E_q[z] is exact for Gaussian posteriors and a Monte Carlo average, with its noise taken out
  of the variance, for a flow (``expected_latent``).
  The variance is exact over the examples seen: the metric keeps sums (n, Σ μ, Σ μ², Σ KL_u)
  in float64, which torchmetrics adds up across processes, so under DDP every example counts
  once exactly when the sampler gives every example to one process once.
* **Posterior collapse**: no active unit, or a total KL of (almost) zero nats, means that
  q(z|x) ≈ p(z) for every x and the decoder ignores z; ``collapse_message`` says so.

Plain torch and torchmetrics: no Lightning, Hydra or W&B.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributions import Distribution
from torchmetrics import Metric

from vaelab.objectives import per_dimension_kl

#: Burda et al.'s threshold on Cov_x(E_q[z_u])
ACTIVE_THRESHOLD = 0.01
#: a total KL below this (nats per example) is "≈ 0": the posterior has collapsed
COLLAPSED_KL = 0.1


def posterior_mean(q: Distribution, num_samples: int = 256) -> torch.Tensor:
    """The centre of q(z|x) ``[*batch, Z]`` that the pictures decode and plot: q's own ``mean``
    (for an IAF posterior g(E[z0]), deterministic), else a Monte Carlo average."""
    try:
        return q.mean
    except NotImplementedError:
        return q.sample((num_samples,)).mean(0)


def expected_latent(q: Distribution, num_samples: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """E_q[z] ``[*batch, Z]`` and the variance of that estimate (None where it is exact).

    Exact where q's ``mean`` is E_q[z] (Gaussian posteriors). A flow's ``mean`` is the image of
    its base mean, not E_q[z] (``exact_mean = False``), so E_q[z] is the average of
    ``num_samples`` draws, whose variance Var_q[z]/S is returned: ``PosteriorStats`` subtracts
    its average from the variance over x of the estimates, which makes Cov_x(E_q[z]) unbiased
    (left in, S = 256 would add up to 1/256 to a unit's 0.01 threshold)."""
    if getattr(q, "exact_mean", True):
        try:
            return q.mean, None
        except NotImplementedError:
            pass
    z = q.sample((num_samples,))
    return z.mean(0), z.var(0) / num_samples


class PosteriorStats(Metric):
    """Sums over test examples of E_q[z] (μ), μ² and the per-dimension KL, reduced by summing
    across processes; ``compute()`` returns the diagnostics as plain Python lists."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, latent_dim: int, threshold: float = ACTIVE_THRESHOLD, **kwargs: Any):
        super().__init__(**kwargs)
        self.latent_dim = int(latent_dim)
        self.threshold = float(threshold)
        zeros = torch.zeros(self.latent_dim, dtype=torch.float64)
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("mean_sum", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("sq_sum", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("kl_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kl_sum", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("noise_sum", zeros.clone(), dist_reduce_fx="sum")  # Σ_x Var of a Monte Carlo E_q[z]

    def update(self, mean: torch.Tensor, kl_per_dim: torch.Tensor | None = None,
               mean_noise: torch.Tensor | None = None) -> None:
        """``mean``: E_q[z|x] ``[B, Z]``; ``kl_per_dim``: KL(q(z_u|x) ‖ p(z_u)) ``[B, Z]`` or None;
        ``mean_noise``: the variance of a Monte Carlo ``mean`` ``[B, Z]`` (None: exact)."""
        mean = mean.detach().reshape(-1, self.latent_dim).double()
        self.count += mean.shape[0]
        self.mean_sum += mean.sum(0)
        self.sq_sum += (mean * mean).sum(0)
        if mean_noise is not None:
            self.noise_sum += mean_noise.detach().reshape(-1, self.latent_dim).double().sum(0)
        if kl_per_dim is not None:
            kl = kl_per_dim.detach().reshape(-1, self.latent_dim).double()
            self.kl_count += kl.shape[0]
            self.kl_sum += kl.sum(0)

    def compute(self) -> dict[str, Any]:  # type: ignore[override]
        n = self.count.clamp_min(1.0)
        mean = self.mean_sum / n
        # Cov_x(E_q[z_u]) over all n; less the estimates' own noise where E_q[z] was sampled
        variance = (self.sq_sum / n - mean * mean - self.noise_sum / n).clamp_min(0.0)
        active = variance > self.threshold
        kl = (self.kl_sum / self.kl_count).tolist() if self.kl_count > 0 else None
        return {
            "num_examples": int(self.count.item()),
            "active_units": int(active.sum().item()),
            "active_threshold": self.threshold,
            "active": active.tolist(),
            "mean_of_means": mean.tolist(),
            "variance_of_means": variance.tolist(),
            "kl_per_dim": kl,
        }


def update_posterior_stats(stats: PosteriorStats, vae: Any, x: torch.Tensor) -> None:
    """Encode ``x`` and add its posterior means and per-dimension KL to ``stats``."""
    with torch.no_grad():
        q = vae.encode(x)
        mean, noise = expected_latent(q)
        stats.update(mean, per_dimension_kl(q, vae.prior_distribution()), noise)


def most_active_dims(diagnostics: dict[str, Any], k: int) -> list[int]:
    """The ``k`` dimensions whose posterior means vary most over the test set."""
    variance = torch.tensor(diagnostics["variance_of_means"])
    return torch.argsort(variance, descending=True)[: max(0, k)].tolist()


def collapse_message(active_units: int, latent_dim: int, total_kl: float) -> str | None:
    """A warning when the posterior has collapsed onto the prior (a KL of almost nothing), or
    when no latent dimension is active though the KL is not small (the posterior means vary
    little with x on the prior's scale: not q ≈ p, which the first warning said of a KL of 21.9
    nats); else None."""
    remedies = "KL warm-up (objective.warmup=...), free bits (objective.free_bits=...), or a weaker decoder."
    if total_kl < COLLAPSED_KL:
        return (
            f"posterior collapse: {active_units} of {latent_dim} latent dimensions are active "
            f"(Cov_x(E_q[z_u]) > {ACTIVE_THRESHOLD}) and KL(q(z|x) ‖ p(z)) = {total_kl:.4f} nats per "
            f"test example: q(z|x) ≈ p(z) for every x, so the decoder ignores z. Remedies: {remedies}"
        )
    if active_units == 0:
        return (
            f"no active latent dimensions: 0 of {latent_dim} have Cov_x(E_q[z_u]) > {ACTIVE_THRESHOLD} (Burda et "
            f"al. 2016), though KL(q(z|x) ‖ p(z)) = {total_kl:.4f} nats per test example: the posterior means "
            "vary little with x on the prior's scale (early in training, or a decoder that models x with little "
            f"help from z). If it lasts: {remedies}"
        )
    return None
