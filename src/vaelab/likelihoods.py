"""Likelihoods p(x|z): decoder outputs in, a ``torch.distributions.Distribution`` out.

Contract (see DESIGN.md): a likelihood is an ``nn.Module`` with

* ``num_params(data_shape) -> int``: how many decoder output channels it needs per data
  channel. The decoder is built with ``num_params * C`` output channels, so its width follows
  from the likelihood and never from arithmetic in YAML.
* ``forward(params) -> Distribution``: ``params`` has shape ``[*batch, P*C, H, W]``; the
  distribution has ``batch_shape == batch`` and ``event_shape == (C, H, W)``, so
  ``log_prob(x)`` is the log-density of one whole example, in nats, summed over its
  dimensions: the unit the tables of the VAE papers use.

``discrete`` says whether ``log_prob`` is a log-probability of a discrete value (Bernoulli on
binary pixels) or a log-density of a continuous value. bits/dim needs to know: a density on
[0, 1] becomes a probability of an 8-bit value only after accounting for the bin width (see
``vaelab.metrics.bits_per_dim``).

Densities are computed in float32 whatever the autocast context, so that mixed-precision
training does not round log-likelihoods of thousands of pixels.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import (
    Bernoulli as _Bernoulli,
)
from torch.distributions import (
    ContinuousBernoulli as _ContinuousBernoulli,
)
from torch.distributions import (
    Distribution,
    Independent,
    Normal,
)

DataShape = tuple[int, int, int]


class Likelihood(nn.Module):
    """Base class of the observation models p(x|z)."""

    #: log_prob is a log-probability mass (True) or a log-density (False)
    discrete: bool = False
    #: the data must be binary: {0, 1}
    requires_binary: bool = False
    #: the support of one data value, for validating a data set before training
    support: tuple[float, float] = (-math.inf, math.inf)

    def num_params(self, data_shape: DataShape) -> int:
        raise NotImplementedError

    def forward(self, params: torch.Tensor) -> Distribution:
        raise NotImplementedError

    @staticmethod
    def _split(params: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        """Split ``[*batch, n*C, H, W]`` into ``n`` tensors ``[*batch, C, H, W]`` in float32."""
        params = params.float()
        if params.shape[-3] % n:
            raise ValueError(
                f"the decoder gave {params.shape[-3]} channels, not a multiple of the "
                f"{n} parameters per value this likelihood needs"
            )
        return params.chunk(n, dim=-3) if n > 1 else (params,)


class Bernoulli(Likelihood):
    """p(x|z) = Π_d λ_d^{x_d} (1 − λ_d)^{1 − x_d},  λ = sigmoid(decoder logits).

    For binary data only (e.g. binarized MNIST, as in Kingma & Welling 2014 and
    Burda et al. 2015). log p(x|z) equals minus the summed binary cross-entropy.
    """

    discrete = True
    requires_binary = True
    support = (0.0, 1.0)

    def num_params(self, data_shape: DataShape) -> int:
        return 1

    def forward(self, params: torch.Tensor) -> Distribution:
        (logits,) = self._split(params, 1)
        return Independent(_Bernoulli(logits=logits, validate_args=False), 3)


class ContinuousBernoulli(Likelihood):
    """p(x|z) = Π_d C(λ_d) λ_d^{x_d} (1 − λ_d)^{1 − x_d} for x ∈ [0, 1] (Loaiza-Ganem &
    Cunningham 2019), with its normalizing constant C(λ) = 2 artanh(1 − 2λ) / (1 − 2λ).

    The proper density for [0, 1]-valued pixels, for which the plain Bernoulli "BCE loss" is
    not normalized.
    """

    support = (0.0, 1.0)

    def num_params(self, data_shape: DataShape) -> int:
        return 1

    def forward(self, params: torch.Tensor) -> Distribution:
        (logits,) = self._split(params, 1)
        return Independent(_ContinuousBernoulli(logits=logits, validate_args=False), 3)


class Gaussian(Likelihood):
    """p(x|z) = Π_d N(x_d; μ_d, σ_d²), μ = decoder output.

    ``sigma`` chooses the scale:

    * a positive number: fixed σ. With σ = 1 this is the "MSE loss" up to its constant:
      log p(x|z) = −½‖x − μ‖² − (D/2) log 2π. The constant is counted, so the number is a
      log-density comparable with other likelihoods.
    * ``"learned"``: one σ shared by all pixels, learned by gradient descent (the σ-VAE of
      Rybkin et al. 2021, whose optimum is σ² = MSE).
    * ``"per_pixel"``: the decoder predicts log σ for every pixel (a heteroscedastic Gaussian).

    Learned scales are kept above ``min_sigma`` with a soft lower bound, so that the density
    cannot collapse onto a single pixel value.
    """

    def __init__(self, sigma: float | str = 1.0, min_sigma: float = 1e-3, init_sigma: float = 0.1):
        super().__init__()
        self.min_sigma = float(min_sigma)
        if isinstance(sigma, str):
            if sigma not in ("learned", "per_pixel"):
                raise ValueError(
                    f"likelihood.sigma={sigma!r} is not an option: give a positive number "
                    "(fixed σ), 'learned' (one learned σ) or 'per_pixel' (σ from the decoder)"
                )
            self.mode = sigma
            self.fixed_sigma = None
        else:
            sigma = float(sigma)
            if not sigma > 0:
                raise ValueError(f"likelihood.sigma must be > 0, got {sigma}")
            self.mode = "fixed"
            self.fixed_sigma = sigma
        if self.min_sigma <= 0:
            raise ValueError(f"likelihood.min_sigma must be > 0, got {min_sigma}")
        if self.mode == "learned":
            if not init_sigma > self.min_sigma:
                raise ValueError("likelihood.init_sigma must be larger than likelihood.min_sigma")
            # inverse of the softplus bound below, so that sigma starts at init_sigma
            raw = math.log(math.expm1(init_sigma - self.min_sigma))
            self.raw_sigma = nn.Parameter(torch.tensor(raw))

    def num_params(self, data_shape: DataShape) -> int:
        return 2 if self.mode == "per_pixel" else 1

    def _bounded(self, raw: torch.Tensor) -> torch.Tensor:
        return self.min_sigma + nn.functional.softplus(raw)

    @property
    def sigma(self) -> torch.Tensor | None:
        """The shared σ (fixed or learned); None when the decoder predicts it per pixel."""
        if self.mode == "fixed":
            return torch.tensor(self.fixed_sigma)
        if self.mode == "learned":
            return self._bounded(self.raw_sigma.float()).detach()
        return None

    def forward(self, params: torch.Tensor) -> Distribution:
        if self.mode == "per_pixel":
            loc, raw = self._split(params, 2)
            scale = self._bounded(raw)
        else:
            (loc,) = self._split(params, 1)
            if self.mode == "learned":
                scale = self._bounded(self.raw_sigma.float()).expand_as(loc)
            else:
                scale = torch.full_like(loc, self.fixed_sigma)
        return Independent(Normal(loc, scale, validate_args=False), 3)
