"""Posteriors q(z|x): encoder features in, a Distribution with event shape ``(latent_dim,)`` out.

The encoder network is the backbone that maps x to a feature vector of width
``posterior.num_params(latent_dim)``; the posterior turns those features into a distribution.
Swapping the family of q (diagonal, full covariance, flows) therefore needs no new encoder.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal


class Posterior(nn.Module):
    """Base class of the approximate posteriors q(z|x)."""

    def num_params(self, latent_dim: int) -> int:
        raise NotImplementedError

    def forward(self, params: torch.Tensor) -> Distribution:
        raise NotImplementedError


class DiagonalGaussian(Posterior):
    """q(z|x) = N(z; μ(x), diag σ²(x)), sampled by reparameterization z = μ + σ ⊙ ε.

    σ = softplus(·) + ``min_scale``: smooth, positive, and without the overflow of exp(·) that
    a log-variance head can hit early in training.
    """

    def __init__(self, min_scale: float = 1e-4):
        super().__init__()
        if not min_scale >= 0:
            raise ValueError(f"posterior.min_scale must be >= 0, got {min_scale}")
        self.min_scale = float(min_scale)

    def num_params(self, latent_dim: int) -> int:
        return 2 * int(latent_dim)

    def forward(self, params: torch.Tensor) -> Distribution:
        loc, raw = params.float().chunk(2, dim=-1)
        scale = nn.functional.softplus(raw) + self.min_scale
        return Independent(Normal(loc, scale, validate_args=False), 1)
