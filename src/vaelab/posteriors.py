"""Posteriors q(z|x): encoder features in, a Distribution with event shape ``(latent_dim,)`` out.

The encoder network is the backbone that maps x to a feature vector of width
``posterior.num_params(latent_dim)``; the posterior turns those features into a distribution.
Swapping the family of q (diagonal, full covariance, flows) therefore needs no new encoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal, register_kl

from vaelab.precision import upcast

try:  # the flow library behind posterior=iaf; everything else works without it
    import zuko
except ImportError:  # pragma: no cover
    zuko = None


class Posterior(nn.Module):
    """Base class of the approximate posteriors q(z|x). Scales are ``softplus(raw) +
    min_scale``: smooth, positive, bounded away from zero."""

    def __init__(self, min_scale: float = 1e-4):
        super().__init__()
        # >= 0 here, so that a checkpoint trained with 0 still loads; a new training run is
        # refused 0 (vaelab.validation: softplus alone underflows to a zero scale, an infinite KL)
        if not min_scale >= 0:
            raise ValueError(f"posterior.min_scale must be >= 0, got {min_scale}")
        self.min_scale = float(min_scale)

    #: whether q(z|x).log_prob(z) of a z it did not sample runs sequential passes (a flow's
    #: inverse): what VampPrior, whose components are such densities, warns of
    sequential_log_prob = False

    def positive(self, raw: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(raw) + self.min_scale

    def num_params(self, latent_dim: int) -> int:
        raise NotImplementedError

    def forward(self, params: torch.Tensor) -> Distribution:
        raise NotImplementedError


class DiagonalGaussian(Posterior):
    """q(z|x) = N(z; μ(x), diag σ²(x)), sampled by reparameterization z = μ + σ ⊙ ε.

    σ = softplus(·) + ``min_scale``: smooth, positive, and without the overflow of exp(·) that
    a log-variance head can hit early in training.
    """

    def num_params(self, latent_dim: int) -> int:
        return 2 * int(latent_dim)

    def forward(self, params: torch.Tensor) -> Distribution:
        loc, raw = upcast(params).chunk(2, dim=-1)
        scale = self.positive(raw)
        return Independent(Normal(loc, scale, validate_args=False), 1)


class FullGaussian(Posterior):
    """q(z|x) = N(z; μ(x), L(x) L(x)ᵀ), L lower-triangular: a full-covariance Gaussian.

        log q(z|x) = −½ ‖L⁻¹(z − μ)‖² − Σ_i log L_ii − (Z/2) log 2π,    z = μ + L ε,  ε ~ N(0, I)

    The encoder gives μ (Z numbers), the raw diagonal of L (Z numbers; L_ii = softplus(·) +
    ``min_scale`` > 0, so L is a valid Cholesky factor) and the strictly-lower entries of L
    (Z(Z−1)/2 numbers, unconstrained): ``num_params = 2Z + Z(Z−1)/2``. The diagonal case is
    L = diag σ. See Kingma & Welling (2019), "An Introduction to Variational Autoencoders",
    §2.5 (full-covariance Gaussian posterior), and Titsias & Lázaro-Gredilla (2014), "Doubly
    Stochastic Variational Bayes for non-Conjugate Inference".

    KL(q ‖ p) is analytic for a Gaussian prior: torch has MultivariateNormal ‖ MultivariateNormal,
    and this module registers MultivariateNormal ‖ Independent(Normal) (``_kl_mvn_diag_normal``).
    """

    def num_params(self, latent_dim: int) -> int:
        z = int(latent_dim)
        return 2 * z + z * (z - 1) // 2

    @staticmethod
    def latent_dim_of(width: int) -> int:
        """Invert ``num_params``: the Z with 2Z + Z(Z−1)/2 = width."""
        z = int(round((-3 + math.sqrt(9 + 8 * width)) / 2))
        if 2 * z + z * (z - 1) // 2 != width:
            raise ValueError(f"{width} encoder features are not 2Z + Z(Z-1)/2 for any Z")
        return z

    def scale_tril(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, L) from the encoder features ``[..., num_params]``."""
        params = upcast(params)
        z = self.latent_dim_of(params.shape[-1])
        loc, raw_diag, off = params.split([z, z, z * (z - 1) // 2], dim=-1)
        rows, cols = torch.tril_indices(z, z, offset=-1, device=params.device)
        tril = params.new_zeros(*params.shape[:-1], z, z)
        tril[..., rows, cols] = off
        diag = self.positive(raw_diag)
        return loc, tril + torch.diag_embed(diag)

    def forward(self, params: torch.Tensor) -> Distribution:
        loc, tril = self.scale_tril(params)
        return MultivariateNormal(loc, scale_tril=tril, validate_args=False)


@register_kl(MultivariateNormal, Independent)
def _kl_mvn_diag_normal(q: MultivariateNormal, p: Independent) -> torch.Tensor:
    """KL(N(μq, Σq) ‖ N(μp, diag σp²)) in closed form:

        ½ [ tr(Σp⁻¹ Σq) + (μp − μq)ᵀ Σp⁻¹ (μp − μq) − Z + log det Σp − log det Σq ]

    with tr(Σp⁻¹ Σq) = Σ_ij L_ij² / σp_i² for Σq = L Lᵀ, and log det Σq = 2 Σ_i log L_ii.
    Only for ``Independent(Normal, 1)``; any other Independent raises NotImplementedError, so
    ``kl_or_monte_carlo`` falls back to Monte Carlo.
    """
    if not (type(p.base_dist) is Normal and p.reinterpreted_batch_ndims == 1):
        raise NotImplementedError
    if q.event_shape != p.event_shape:
        raise ValueError(f"KL between event shapes {tuple(q.event_shape)} and {tuple(p.event_shape)}")
    var_p = p.base_dist.scale**2  # [..., Z]
    tril = q.scale_tril  # [..., Z, Z]
    trace = (tril**2 / var_p.unsqueeze(-1)).sum((-2, -1))
    mahalanobis = ((p.base_dist.loc - q.loc) ** 2 / var_p).sum(-1)
    logdet_p = torch.log(var_p).sum(-1)
    logdet_q = 2 * torch.log(torch.diagonal(tril, dim1=-2, dim2=-1)).sum(-1)
    z = q.event_shape[-1]
    return 0.5 * (trace + mahalanobis - z + logdet_p - logdet_q)


def _zuko():
    if zuko is None:
        raise ImportError("posterior=iaf needs the flow library zuko: pip install 'zuko>=1.2'")
    return zuko


if zuko is not None:

    class IAFDistribution(zuko.distributions.NormalizingFlow):
        """z = g(z0), z0 ~ base: ``rsample`` and ``rsample_and_log_prob`` run g (one parallel
        pass); ``log_prob(z)`` of an arbitrary z runs g⁻¹ (Z sequential passes per transform).

        ``mean`` is g(E[z0]), the image of the base mean: the exact mean of q has no closed
        form. It is what ``VAE.reconstruct`` decodes ("z = the centre of q(z|x)");
        ``exact_mean = False`` tells the diagnostics to estimate E_q[z] by sampling
        (``vaelab.diagnostics.expected_latent``).
        """

        exact_mean = False

        @property
        def mean(self) -> torch.Tensor:
            return self.transform.inv(self.base.mean)


class IAF(Posterior):
    """Inverse autoregressive flow (Kingma et al. 2016, "Improved Variational Inference with
    Inverse Autoregressive Flow", NeurIPS) on top of the diagonal Gaussian:

        z_0 = μ(x) + σ(x) ⊙ ε,  ε ~ N(0, I)
        z_t = m_t(z_{t−1}, h) + s_t(z_{t−1}, h) ⊙ z_{t−1},   t = 1..T
        log q(z_T|x) = log N(z_0; μ, diag σ²) − Σ_t Σ_i log s_{t,i}

    where (m_t, s_t)_i depend on (z_{t−1})_{<i} (a MADE network, zuko's
    ``MaskedAutoregressiveTransform`` with the monotonic affine map s = exp(a), a soft-clamped)
    and on a context h(x) from the encoder; the variable order is reversed between steps.
    The encoder gives [μ (Z), raw σ (Z; σ = softplus + ``min_scale``), h (``context_features``)]:
    ``num_params = 2Z + context_features``.

    Sampling is the autoregressive network's *forward* (parallel) direction, so ``rsample`` and
    ``rsample_and_log_prob`` are one pass each, and the latter returns the exact log q of its
    own samples: the objectives use it (``vaelab.vae.rsample_and_log_prob``). ``log_prob(z)``
    for an arbitrary z needs the inverse (Z sequential passes per step); it is correct but slow.
    KL(q ‖ p) has no closed form: it is always a Monte Carlo estimate.
    """

    sequential_log_prob = True

    def __init__(
        self,
        latent_dim: int,
        num_transforms: int = 2,
        context_features: int = 32,
        hidden_features: Sequence[int] = (64, 64),
        min_scale: float = 1e-4,
    ):
        super().__init__(min_scale)
        zuko = _zuko()
        self.latent_dim = int(latent_dim)
        if self.latent_dim < 1:
            raise ValueError(f"posterior.latent_dim must be >= 1, got {latent_dim}")
        if int(num_transforms) < 1:
            raise ValueError(f"posterior.num_transforms must be >= 1, got {num_transforms}")
        if int(context_features) < 0:
            raise ValueError(f"posterior.context_features must be >= 0, got {context_features}")
        self.num_transforms = int(num_transforms)
        self.context_features = int(context_features)
        orders = (torch.arange(self.latent_dim), torch.arange(self.latent_dim).flip(0))
        self.flow = zuko.lazy.LazyComposedTransform(
            *(
                zuko.flows.MaskedAutoregressiveTransform(
                    features=self.latent_dim,
                    context=self.context_features,
                    order=orders[t % 2],
                    hidden_features=tuple(int(h) for h in hidden_features),
                )
                for t in range(self.num_transforms)
            )
        )

    def num_params(self, latent_dim: int) -> int:
        if int(latent_dim) != self.latent_dim:
            raise ValueError(f"posterior.latent_dim={self.latent_dim} differs from latent_dim={latent_dim}")
        return 2 * self.latent_dim + self.context_features

    def forward(self, params: torch.Tensor) -> Distribution:
        z = self.latent_dim
        loc, raw, context = upcast(params).split([z, z, self.context_features], dim=-1)
        scale = self.positive(raw)
        base = Independent(Normal(loc, scale, validate_args=False), 1)
        # zuko's NormalizingFlow(f, base) samples with f⁻¹ and evaluates densities with f;
        # f = (autoregressive transforms)⁻¹ makes sampling the parallel direction (IAF).
        sample_map = self.flow(context if self.context_features else None)
        return IAFDistribution(sample_map.inv, base)
