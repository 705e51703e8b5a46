"""Training objectives. Each returns the loss to minimize and the per-example terms to log.

All terms are in nats per example (summed over the dimensions of one example), so
``elbo = recon − kl`` holds exactly for the logged numbers, and they compare with the tables
of the VAE papers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vaelab.vae import VAE, float32, kl_or_monte_carlo


@dataclass
class ObjectiveOutput:
    """``loss``: the scalar to minimize. ``terms``: per-example tensors ``[B]`` (nats).
    ``scalars``: settings worth logging (β, ...). ``analytic_kl``: how the KL was computed."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    scalars: dict[str, float] = field(default_factory=dict)
    analytic_kl: bool = True


class Objective(nn.Module):
    def forward(self, vae: VAE, x: torch.Tensor) -> ObjectiveOutput:
        raise NotImplementedError


class ELBO(Objective):
    """The evidence lower bound, with S reparameterized samples and a KL weight β:

        ELBO(x) = E_q(z|x)[log p(x|z)] − KL(q(z|x) ‖ p(z))
        loss    = −mean_x( E_q[log p(x|z)] − β · KL )

    β = 1 is the VAE of Kingma & Welling (2014); β > 1 the β-VAE of Higgins et al. (2017).
    Whatever β, the logged ``elbo`` is the true bound (β = 1); ``loss`` is what is minimized.
    The KL is analytic where torch.distributions registers the pair (q, p), else Monte Carlo
    on the same samples.
    """

    def __init__(self, num_samples: int = 1, beta: float = 1.0):
        super().__init__()
        if int(num_samples) < 1:
            raise ValueError(f"objective.num_samples must be >= 1, got {num_samples}")
        if not float(beta) >= 0:
            raise ValueError(f"objective.beta must be >= 0, got {beta}")
        self.num_samples = int(num_samples)
        self.beta = float(beta)

    def forward(self, vae: VAE, x: torch.Tensor) -> ObjectiveOutput:
        q = vae.encode(x)
        z = q.rsample((self.num_samples,))  # [S, B, Z]
        px = vae.decode(z)  # batch shape [S, B]
        with float32(x.device):
            recon = px.log_prob(x).mean(0)  # E_q[log p(x|z)]  [B]
            kl, analytic = kl_or_monte_carlo(q, vae.prior_distribution(), z.float())
            elbo = recon - kl
            loss = -(recon - self.beta * kl).mean()
        return ObjectiveOutput(
            loss=loss,
            terms={"elbo": elbo, "recon": recon, "kl": kl},
            scalars={"beta": self.beta},
            analytic_kl=analytic,
        )
