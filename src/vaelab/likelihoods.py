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
from torch.distributions import (
    Laplace as _Laplace,
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


class _LocationScale(Likelihood):
    """Shared scale handling of the location–scale likelihoods (Gaussian, Laplace).

    The scale option (``sigma`` for Gaussian, ``scale`` for Laplace; ``_scale_name``) is

    * a positive number: a fixed scale;
    * ``"learned"``: one scale shared by all pixels, learned by gradient descent;
    * ``"per_pixel"``: the decoder predicts a raw scale for every pixel (2 parameters per value).

    Learned scales are ``min + softplus(raw)``: kept above the minimum with a soft lower bound, so
    the density cannot collapse onto a single pixel value. The learned parameter is called
    ``raw_<name>`` (``raw_sigma`` for Gaussian, as in checkpoints written before this class).
    """

    #: the name of the scale option in the config and in messages
    _scale_name: str = "scale"

    def __init__(self, scale: float | str, min_scale: float, init_scale: float):
        super().__init__()
        name = self._scale_name
        self.min_scale = float(min_scale)
        if isinstance(scale, str):
            if scale not in ("learned", "per_pixel"):
                raise ValueError(
                    f"likelihood.{name}={scale!r} is not an option: give a positive number "
                    f"(fixed {name}), 'learned' (one learned {name}) or 'per_pixel' ({name} from the "
                    "decoder)"
                )
            self.mode = scale
            self.fixed_scale = None
        else:
            scale = float(scale)
            if not scale > 0:
                raise ValueError(f"likelihood.{name} must be > 0, got {scale}")
            self.mode = "fixed"
            self.fixed_scale = scale
        if self.min_scale <= 0:
            raise ValueError(f"likelihood.min_{name} must be > 0, got {min_scale}")
        if self.mode == "learned":
            if not init_scale > self.min_scale:
                raise ValueError(f"likelihood.init_{name} must be larger than likelihood.min_{name}")
            # inverse of the softplus bound below, so that the scale starts at init_scale
            raw = math.log(math.expm1(init_scale - self.min_scale))
            self.register_parameter(f"raw_{name}", nn.Parameter(torch.tensor(raw)))

    def num_params(self, data_shape: DataShape) -> int:
        return 2 if self.mode == "per_pixel" else 1

    def _bounded(self, raw: torch.Tensor) -> torch.Tensor:
        return self.min_scale + nn.functional.softplus(raw)

    def _raw_scale(self) -> torch.Tensor:
        return getattr(self, f"raw_{self._scale_name}").float()

    def _shared_scale(self) -> torch.Tensor | None:
        """The shared scale (fixed or learned); None when the decoder predicts it per pixel."""
        if self.mode == "fixed":
            return torch.tensor(self.fixed_scale)
        if self.mode == "learned":
            return self._bounded(self._raw_scale()).detach()
        return None

    def _loc_scale(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale, both ``[*batch, C, H, W]`` in float32."""
        if self.mode == "per_pixel":
            loc, raw = self._split(params, 2)
            return loc, self._bounded(raw)
        (loc,) = self._split(params, 1)
        if self.mode == "learned":
            return loc, self._bounded(self._raw_scale()).expand_as(loc)
        return loc, torch.full_like(loc, self.fixed_scale)


class Gaussian(_LocationScale):
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

    _scale_name = "sigma"

    def __init__(self, sigma: float | str = 1.0, min_sigma: float = 1e-3, init_sigma: float = 0.1):
        super().__init__(sigma, min_sigma, init_sigma)

    @property
    def fixed_sigma(self) -> float | None:
        return self.fixed_scale

    @property
    def min_sigma(self) -> float:
        return self.min_scale

    @property
    def sigma(self) -> torch.Tensor | None:
        """The shared σ (fixed or learned); None when the decoder predicts it per pixel."""
        return self._shared_scale()

    def forward(self, params: torch.Tensor) -> Distribution:
        loc, scale = self._loc_scale(params)
        return Independent(Normal(loc, scale, validate_args=False), 3)


class Laplace(_LocationScale):
    """p(x|z) = Π_d Laplace(x_d; μ_d, b_d) = Π_d exp(−|x_d − μ_d| / b_d) / (2 b_d),
    μ = decoder output.

    The "L1 loss" counterpart of the Gaussian: with a fixed b, −log p(x|z) = ‖x − μ‖₁ / b +
    D log 2b. Laplace observation models for images go back to the robust/L1 reconstruction
    losses of image VAEs; see e.g. Rybkin et al. 2021 ("Simple and Effective VAE Training with
    Calibrated Decoders"), which compares calibrated Gaussian and Laplace decoders.

    ``scale`` chooses b, as ``sigma`` does for the Gaussian:

    * a positive number: fixed b;
    * ``"learned"``: one b shared by all pixels, learned (its optimum is b = mean |x − μ|);
    * ``"per_pixel"``: the decoder predicts b for every pixel (2 parameters per value).

    Learned scales are kept above ``min_scale`` with a soft lower bound.
    """

    _scale_name = "scale"

    def __init__(self, scale: float | str = 0.1, min_scale: float = 1e-3, init_scale: float = 0.1):
        super().__init__(scale, min_scale, init_scale)

    @property
    def scale(self) -> torch.Tensor | None:
        """The shared b (fixed or learned); None when the decoder predicts it per pixel."""
        return self._shared_scale()

    def forward(self, params: torch.Tensor) -> Distribution:
        loc, scale = self._loc_scale(params)
        return Independent(_Laplace(loc, scale, validate_args=False), 3)
