"""Priors p(z): an ``nn.Module`` whose call returns a Distribution with event shape
``(latent_dim,)``.

Priors are modules (not bare distributions) so that their parameters and buffers move with
the model between devices, are saved in checkpoints, and, for learned priors, are trained.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal


class Prior(nn.Module):
    """Base class of the priors p(z)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        latent_dim = int(latent_dim)
        if latent_dim <= 0:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")
        self.latent_dim = latent_dim

    def forward(self) -> Distribution:
        raise NotImplementedError


class StandardNormal(Prior):
    """p(z) = N(z; 0, I), the prior of Kingma & Welling (2014).

    Returned as ``Independent(Normal(0, 1), 1)``, so ``kl_divergence`` with a diagonal
    Gaussian posterior dispatches to torch's closed form.
    """

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        self.register_buffer("loc", torch.zeros(self.latent_dim), persistent=False)
        self.register_buffer("scale", torch.ones(self.latent_dim), persistent=False)

    def forward(self) -> Distribution:
        return Independent(Normal(self.loc.float(), self.scale.float(), validate_args=False), 1)
