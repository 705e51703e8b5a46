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
binary pixels; Categorical and DiscretizedLogisticMixture on the integer intensity levels, which
``requires_levels``) or a log-density of a continuous value. bits/dim needs to know: a density on
[0, 1] becomes a probability of an 8-bit value only after accounting for the bin width (see
``vaelab.metrics.bits_per_dim``).

Densities are computed in float32 whatever the autocast context, so that mixed-precision
training does not round log-likelihoods of thousands of pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import (
    Bernoulli as _Bernoulli,
)
from torch.distributions import (
    Categorical as _Categorical,
)
from torch.distributions import (
    ContinuousBernoulli as _ContinuousBernoulli,
)
from torch.distributions import (
    Distribution,
    Independent,
    Normal,
    constraints,
)
from torch.distributions import (
    Laplace as _Laplace,
)

from vaelab.precision import upcast

DataShape = tuple[int, int, int]


def _check_levels(num_levels: int | None, who: str) -> int | None:
    if num_levels is None:
        return None
    if isinstance(num_levels, bool) or int(num_levels) != num_levels or num_levels < 2:
        raise ValueError(f"{who}: the number of levels must be an integer >= 2, got {num_levels!r}")
    return int(num_levels)


def _to_levels(x: torch.Tensor, num_levels: int) -> torch.Tensor:
    """x = k / (L − 1) in [0, 1] → the integer level k (rounded to the nearest level, clamped)."""
    return (x.float() * (num_levels - 1)).round().long().clamp(0, num_levels - 1)


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(−d)) for d > 0, accurate for small and large d (Mächler 2012)."""
    small = d.clamp(min=1e-30, max=math.log(2.0))
    large = d.clamp(min=math.log(2.0))
    return torch.where(d < math.log(2.0), torch.log(-torch.expm1(-small)), torch.log1p(-torch.exp(-large)))


class Likelihood(nn.Module):
    """Base class of the observation models p(x|z)."""

    #: log_prob is a log-probability mass (True) or a log-density (False)
    discrete: bool = False
    #: the data must be binary: {0, 1}
    requires_binary: bool = False
    #: the support of one data value, for validating a data set before training
    support: tuple[float, float] = (-math.inf, math.inf)
    #: log_prob is a probability of the integer level k of x = k / (L − 1): the data must be
    #: the stored intensities with exactly ``num_levels`` levels, neither binarized nor
    #: dequantized (checked by ``VAEModule`` before training)
    requires_levels: bool = False
    #: L for such likelihoods (None: not yet known; ``set_num_levels`` takes the data's)
    num_levels: int | None = None

    def set_num_levels(self, num_levels: int | None) -> None:
        """Told the data's number of intensity levels by ``build_vae`` before the decoder is
        built. A likelihood over levels whose count the config left ``null`` takes the data's;
        the others ignore it (a mismatch is refused by ``VAEModule``, with the fix)."""
        if not self.requires_levels or self.num_levels is not None:
            return
        if num_levels is None:
            raise ValueError(
                f"{type(self).__name__}: the number of levels was left null, to be taken from the "
                "data, but the data's number of levels was not given: set it in the likelihood config"
            )
        self.num_levels = _check_levels(num_levels, type(self).__name__)

    def num_params(self, data_shape: DataShape) -> int:
        raise NotImplementedError

    def forward(self, params: torch.Tensor) -> Distribution:
        raise NotImplementedError

    @staticmethod
    def _split(params: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        """Split ``[*batch, n*C, H, W]`` into ``n`` tensors ``[*batch, C, H, W]`` in float32."""
        params = upcast(params)
        if params.shape[-3] % n:
            raise ValueError(
                f"the decoder gave {params.shape[-3]} channels, not a multiple of the "
                f"{n} parameters per value this likelihood needs"
            )
        return params.chunk(n, dim=-3) if n > 1 else (params,)


class _BCEWithLogitsCPU(torch.autograd.Function):
    """``binary_cross_entropy_with_logits(l, x, reduction="none")`` for CPU tensors:

        max(l, 0) − l·x + log(1 + exp(−|l|))

    torch's formula, with ``log`` where torch uses ``log1p``: this torch's CPU ``log1p`` is not
    vectorized (about 1 ms for the 100,352 pixels of a batch of 128 MNIST images, one thread,
    against 0.09 ms for ``log``), and it was most of a Bernoulli likelihood's cost, in training
    and more so in importance-sampled evaluation. The argument of ``log`` lies in (1, 2], where
    float32 rounds it by at most 6e-8, so the result differs from ``log1p``'s by about 1e-7 nats
    a pixel at most (against float64 the test finds the same worst error as torch's kernel). The
    gradient is torch's: (sigmoid(l) − x) for the logits, −l for the target.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, target)
        return logits.clamp(min=0).sub_(logits * target).add_(logits.abs().neg_().exp_().add_(1).log_())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        logits, target = ctx.saved_tensors
        d_logits = grad * (torch.sigmoid(logits) - target) if ctx.needs_input_grad[0] else None
        d_target = -grad * logits if ctx.needs_input_grad[1] else None
        return d_logits, d_target


def binary_cross_entropy_with_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-element BCE with logits: torch's fused kernel on accelerators, ``_BCEWithLogitsCPU``
    on the CPU."""
    if logits.device.type == "cpu":
        return _BCEWithLogitsCPU.apply(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none")


class _BernoulliImage(Independent):
    """``Independent(Bernoulli(logits), 3)``, with the same ``log_prob`` computed in fewer
    passes over the pixels.

    torch's ``Bernoulli.log_prob`` is ``−BCE(logits, x)`` per pixel: a negation of the whole
    ``[*batch, C, H, W]`` tensor, and another in the backward pass, before ``Independent``
    sums over the pixels. Negating after the sum gives the same numbers (negation is exact in
    floating point) and skips both full-size passes: about 0.2 ms of the MLP VAE's step on
    binarized MNIST on this project's CPU benchmark. On the CPU the per-pixel term comes from
    ``binary_cross_entropy_with_logits`` below (torch's value to float32 rounding, torch's
    gradient). Everything else (``mean``, ``sample``, ``entropy``, ``expand``) is
    ``Independent``'s.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits = self.base_dist.logits
        logits, value = torch.broadcast_tensors(logits, value.to(logits.dtype))
        per_pixel = binary_cross_entropy_with_logits(logits, value)
        return -per_pixel.flatten(-self.reinterpreted_batch_ndims).sum(-1)


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
        return _BernoulliImage(_Bernoulli(logits=logits, validate_args=False), 3)


class LogitContinuousBernoulli(_ContinuousBernoulli):
    """torch's ``ContinuousBernoulli``, with every quantity that depends on λ computed from the
    logit l = log(λ / (1 − λ)) in closed form, so that it stays exact at any logit.

    torch clamps λ to [ε, 1 − ε] (float32: |l| ≤ 15.9) before the normalizing constant, the
    mean and the inverse CDF. Beyond that the constant stops growing: log C sticks at 2.769,
    where the true value at l = ±20 is 2.996 and at ±100 is 4.605, so log p(x|z) came out too
    low by 0.23 nats a pixel at |l| = 20 and 1.8 at 100, and its gradient through C was zero.
    A decoder fitting near-constant pixels (the black background of MNIST) is pushed to exactly
    those logits. In terms of l (with 1 − 2λ = −tanh(l/2) and artanh(1 − 2λ) = −l/2):

        log C(l) = log(l / tanh(l/2))              (log 2 + l²/12 − 7l⁴/1440 + 31l⁶/90720 near 0)
        E[x]     = 1 / (1 − e^(−l)) − 1/l           (1/2 + l/12 − l³/720 + l⁵/30240 near 0)
        Var[x]   = 1/l² − 1 / (4 sinh²(l/2))        (1/12 − l²/240 + l⁴/6048 near 0)
        F(x)     = expm1(l·x) / expm1(l),  F⁻¹(u) = log1p(u · expm1(l)) / l

    with the series used for |l| < ¼ (where the closed forms lose digits to cancellation; the
    series' first omitted term is under 1e-9 there), and F, F⁻¹ rewritten with e^(−l) for
    l > 1 (no overflow). ``log_prob`` is torch's: −BCE(l, x) + log C(l), from the logits;
    ``rsample`` and ``sample`` are torch's F⁻¹ of a uniform draw, so they use this ``icdf``.
    """

    _SERIES = 0.25

    @staticmethod
    def _split(lg: torch.Tensor, below: float = _SERIES) -> tuple[torch.Tensor, torch.Tensor]:
        """(|l| < ``below``, the logits with 1 put there): the closed form then sees no 0/0, and
        its discarded branch gives ``torch.where`` finite gradients."""
        near = lg.abs() < below
        return near, torch.where(near, torch.ones_like(lg), lg)

    def _cont_bern_log_norm(self) -> torch.Tensor:
        lg = self.logits
        near, safe = self._split(lg)
        a = safe.abs()
        exact = a.log() - torch.tanh(a / 2).log()
        l2 = lg * lg
        series = math.log(2) + l2 * (1 / 12 - l2 * (7 / 1440 - l2 * (31 / 90720)))
        return torch.where(near, series, exact)

    @property
    def mean(self) -> torch.Tensor:
        lg = self.logits
        near, safe = self._split(lg)
        exact = -1 / torch.expm1(-safe) - 1 / safe
        l2 = lg * lg
        series = 0.5 + lg * (1 / 12 - l2 * (1 / 720 - l2 / 30240))
        return torch.where(near, series, exact)

    @property
    def variance(self) -> torch.Tensor:
        lg = self.logits
        near, safe = self._split(lg)
        a = safe.abs()  # 1 / (4 sinh²(a/2)) = e^(−a) / expm1(−a)²: no overflow, finite gradients
        exact = 1 / (a * a) - torch.exp(-a) / torch.expm1(-a) ** 2
        l2 = lg * lg
        series = 1 / 12 - l2 * (1 / 240 - l2 / 6048)
        return torch.where(near, series, exact)

    #: F and F⁻¹ are ratios of small, accurately computed numbers near l = 0 (no cancellation),
    #: 0/0 only at l = 0 itself, where the distribution is uniform: below this |l|, F(x) = x
    _UNIFORM = 1e-6

    def cdf(self, value: torch.Tensor) -> torch.Tensor:
        lg = self.logits
        tiny, safe = self._split(lg, self._UNIFORM)
        low_l, high_l = safe.clamp(max=1), safe.clamp(min=1)  # each form where it cannot overflow
        low = torch.expm1(low_l * value) / torch.expm1(low_l)
        high = torch.exp(-high_l * (1 - value)) * torch.expm1(-high_l * value) / torch.expm1(-high_l)
        return torch.where(tiny, value, torch.where(lg <= 1, low, high)).clamp(0, 1)

    def icdf(self, value: torch.Tensor) -> torch.Tensor:
        lg = self.logits
        tiny, safe = self._split(lg, self._UNIFORM)
        low_l, high_l = safe.clamp(max=1), safe.clamp(min=1)
        low = torch.log1p(value * torch.expm1(low_l)) / low_l
        high = 1 + torch.log(value + (1 - value) * torch.exp(-high_l)) / high_l
        return torch.where(tiny, value, torch.where(lg <= 1, low, high)).clamp(0, 1)

    def entropy(self) -> torch.Tensor:
        # −E[log p(x)] = −E[x]·l + softplus(l) − log C(l)
        return F.softplus(self.logits) - self.logits * self.mean - self._cont_bern_log_norm()


class ContinuousBernoulli(Likelihood):
    """p(x|z) = Π_d C(λ_d) λ_d^{x_d} (1 − λ_d)^{1 − x_d} for x ∈ [0, 1] (Loaiza-Ganem &
    Cunningham 2019), with its normalizing constant C(λ) = 2 artanh(1 − 2λ) / (1 − 2λ), computed
    from the decoder's logits at any magnitude (``LogitContinuousBernoulli``).

    The proper density for [0, 1]-valued pixels, for which the plain Bernoulli "BCE loss" is
    not normalized.
    """

    support = (0.0, 1.0)

    def num_params(self, data_shape: DataShape) -> int:
        return 1

    def forward(self, params: torch.Tensor) -> Distribution:
        (logits,) = self._split(params, 1)
        return Independent(LogitContinuousBernoulli(logits=logits, validate_args=False), 3)


class _SharedScaleImage(Independent):
    """``Independent(base(μ, s), 3)`` for one scale s shared by every pixel (fixed or learned),
    with the same ``log_prob`` computed in fewer passes over the pixels: the per-pixel distance
    d(x − μ) summed first, s entering afterwards as a scalar,

        log p(x|z) = Σ_d d(x_d − μ_d) / divisor(s) − D (log s + c)

    torch's ``log_prob`` works pixel by pixel on a full-size s: s², log s, the division and the
    subtractions are each a pass over ``[*batch, C, H, W]`` forward and again backward. The same
    numbers to float32 rounding and the same gradients, for μ and for a learned s (tested
    against torch). ``mean``, ``sample``, ``rsample``, ``entropy``, ``expand`` are
    ``Independent``'s of ``base(μ, s)``, whose scale is the one s expanded (a view)."""

    @staticmethod
    def _distance(diff: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _divisor(scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    _log_constant: float  # c

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        loc, scale = self.base_dist.loc, self.base_dist.scale
        s = scale[(0,) * scale.dim()]  # every pixel's scale is this one (a view: gradients reach it)
        total = self._distance(value.to(loc.dtype) - loc).flatten(-3).sum(-1)
        return total / self._divisor(s) - loc.shape[-3:].numel() * (s.log() + self._log_constant)


class _SharedSigmaNormalImage(_SharedScaleImage):
    """``Independent(Normal(μ, σ), 3)`` with one σ: log p(x|z) = −Σ_d (x_d − μ_d)² / (2σ²) − D (log σ + ½ log 2π)."""

    _distance = staticmethod(torch.square)
    _log_constant = 0.5 * math.log(2 * math.pi)

    @staticmethod
    def _divisor(scale: torch.Tensor) -> torch.Tensor:
        return -2 * scale.square()


class _SharedScaleLaplaceImage(_SharedScaleImage):
    """``Independent(Laplace(μ, b), 3)`` with one b: log p(x|z) = −Σ_d |x_d − μ_d| / b − D log 2b."""

    _distance = staticmethod(torch.abs)
    _log_constant = math.log(2)

    @staticmethod
    def _divisor(scale: torch.Tensor) -> torch.Tensor:
        return -scale


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
    #: the per-pixel distribution, and its Independent for one scale shared by every pixel
    _base: type[Distribution]
    _shared_image: type[Independent]

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
        return upcast(getattr(self, f"raw_{self._scale_name}"))

    def _shared_scale(self) -> torch.Tensor | None:
        """The shared scale (fixed or learned); None when the decoder predicts it per pixel."""
        return None if self.mode == "per_pixel" else self._one_scale().detach()

    def _one_scale(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """The scale shared by every pixel (fixed or learned) as a 0-dim tensor; a fixed one as
        a fill on ``like``'s device (no copy from the host, which a CUDA graph could not record)."""
        if self.mode == "learned":
            return self._bounded(self._raw_scale())
        return torch.tensor(self.fixed_scale) if like is None else like.new_full((), self.fixed_scale)

    def forward(self, params: torch.Tensor) -> Distribution:
        """p(x|z) over ``[*batch, C, H, W]`` in float32: the decoder's location, and the scale
        it predicts per pixel or the one shared by every pixel (then ``_shared_image``)."""
        if self.mode == "per_pixel":
            loc, raw = self._split(params, 2)
            return Independent(self._base(loc, self._bounded(raw), validate_args=False), 3)
        (loc,) = self._split(params, 1)
        scale = self._one_scale(loc).expand_as(loc)  # a view, no copy
        return self._shared_image(self._base(loc, scale, validate_args=False), 3, validate_args=False)


class Gaussian(_LocationScale):
    """p(x|z) = Π_d N(x_d; μ_d, σ_d²), μ = decoder output.

    ``sigma`` chooses the scale:

    * a positive number: fixed σ. With σ = 1 this is the "MSE loss" up to its constant:
      log p(x|z) = −½‖x − μ‖² − (D/2) log 2π. The constant is counted, so the number is a
      log-density comparable with other likelihoods.
    * ``"learned"``: one σ shared by all pixels, learned by gradient descent (the σ-VAE of
      Rybkin et al. 2021, whose optimum is σ² = MSE).
    * ``"per_pixel"``: the decoder predicts σ for every pixel, as σ = min_sigma + softplus(raw)
      (a heteroscedastic Gaussian).

    Learned scales are kept above ``min_sigma`` with a soft lower bound, so that the density
    cannot collapse onto a single pixel value.
    """

    _scale_name = "sigma"
    _base = Normal
    _shared_image = _SharedSigmaNormalImage

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
    _base = _Laplace
    _shared_image = _SharedScaleLaplaceImage

    def __init__(self, scale: float | str = 0.1, min_scale: float = 1e-3, init_scale: float = 0.1):
        super().__init__(scale, min_scale, init_scale)

    @property
    def scale(self) -> torch.Tensor | None:
        """The shared b (fixed or learned); None when the decoder predicts it per pixel."""
        return self._shared_scale()


# --- likelihoods over the integer intensity levels --------------------------------------------
class _LevelDistribution(Distribution):
    """Base of the distributions over the levels x = k / (L − 1) of ``[*batch, C, H, W]`` data.

    ``log_prob`` takes x in [0, 1] (as the data modules give it) and maps it back to k =
    round(x (L − 1)); it is the log-probability of the discrete value, summed over (C, H, W).
    ``sample()`` and ``.mean`` are in [0, 1] as well (samples on the k / (L − 1) grid).
    """

    arg_constraints: dict = {}
    support = constraints.interval(0.0, 1.0)
    has_rsample = False

    def __init__(self, batch_shape: torch.Size, event_shape: torch.Size, num_levels: int):
        self.num_levels = int(num_levels)
        super().__init__(batch_shape, event_shape, validate_args=False)

    def _levels(self, x: torch.Tensor) -> torch.Tensor:
        return _to_levels(x, self.num_levels)

    def _to_unit(self, k: torch.Tensor) -> torch.Tensor:
        return k.float() / (self.num_levels - 1)


class LevelCategorical(_LevelDistribution):
    """Independent L-way categoricals over the levels of every value: ``Independent(Categorical)``
    over (C, H, W) on the integer levels, with x ∈ [0, 1] in and out."""

    def __init__(self, logits: torch.Tensor):
        """``logits``: ``[*batch, C, H, W, L]``."""
        logits = upcast(logits)
        self.base = Independent(_Categorical(logits=logits, validate_args=False), 3)
        super().__init__(logits.shape[:-4], logits.shape[-4:-1], logits.shape[-1])

    @property
    def logits(self) -> torch.Tensor:
        """Normalized log-probabilities of the levels, ``[*batch, C, H, W, L]``."""
        return self.base.base_dist.logits

    @property
    def probs(self) -> torch.Tensor:
        return self.base.base_dist.probs

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.log_prob(self._levels(x))

    @property
    def mean(self) -> torch.Tensor:
        grid = torch.arange(self.num_levels, device=self.logits.device, dtype=torch.float32)
        return (self.probs * grid).sum(-1) / (self.num_levels - 1)

    @property
    def mode(self) -> torch.Tensor:
        return self._to_unit(self.logits.argmax(-1))

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        with torch.no_grad():
            return self._to_unit(self.base.sample(torch.Size(sample_shape)))

    def entropy(self) -> torch.Tensor:
        return self.base.entropy()


class Categorical(Likelihood):
    """p(x|z) = Π_d softmax(ℓ_d)[k_d],  k_d = round(x_d (L − 1)): an L-way categorical over the
    intensity levels of every value, the decoder giving L logits ℓ_d per value.

    The "softmax over 256 values" observation model of PixelRNN/PixelCNN (van den Oord et al.
    2016, "Pixel Recurrent Neural Networks"), here conditionally independent given z. Makes no
    assumption of smoothness or unimodality across levels, at the cost of L decoder channels
    per value.

    ``num_classes`` is L and must equal the data's number of levels (256 for 8-bit images, 17
    for the digits); ``None`` takes the data's. The data must be the stored intensities, not
    binarized or dequantized (``requires_levels``). ``log_prob`` is the log-probability of the
    discrete value, so bits/dim needs no bin-width correction (``discrete``).
    """

    discrete = True
    requires_levels = True
    support = (0.0, 1.0)

    def __init__(self, num_classes: int | None = 256):
        super().__init__()
        self.num_levels = _check_levels(num_classes, "likelihood.num_classes")

    @property
    def num_classes(self) -> int | None:
        return self.num_levels

    def _levels_known(self) -> int:
        if self.num_levels is None:
            raise RuntimeError(f"{type(self).__name__}: the number of levels is not known yet (set_num_levels)")
        return self.num_levels

    def num_params(self, data_shape: DataShape) -> int:
        return self._levels_known()

    def forward(self, params: torch.Tensor) -> Distribution:
        logits = torch.stack(self._split(params, self._levels_known()), dim=-1)
        return LevelCategorical(logits)


class LogisticMixtureLevels(_LevelDistribution):
    """A mixture of K logistics per value, discretized to the L levels (PixelCNN++): see
    ``DiscretizedLogisticMixture``. Parameters are ``[*batch, C, H, W, K]``."""

    def __init__(self, logit_probs: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor,
                 num_levels: int):
        self.log_weights = torch.log_softmax(upcast(logit_probs), dim=-1)
        self.means = upcast(means)
        self.log_scales = upcast(log_scales)
        super().__init__(means.shape[:-4], means.shape[-4:-1], num_levels)

    @property
    def half_bin(self) -> float:
        """Half the distance between neighbouring levels on the [−1, 1] scale."""
        return 1.0 / (self.num_levels - 1)

    def log_prob_levels(self, k: torch.Tensor) -> torch.Tensor:
        """log P(k) per value, ``[*, C, H, W]``, for integer levels k (broadcast with the batch).

        Per component, with a = (x + δ − μ)/s, b = (x − δ − μ)/s and x = 2k/(L−1) − 1:
        P = σ(a) − σ(b), written as log σ(a) + log σ(−b) + log(1 − e^{−(a−b)}), which is exact
        and stable for every s; the edge levels integrate to ±∞: P(0) = σ(a), P(L−1) = σ(−b).
        """
        last = self.num_levels - 1
        k = k.unsqueeze(-1)
        x = 2.0 * k.float() / last - 1.0
        inv_s = torch.exp(-self.log_scales)
        centered = x - self.means
        delta = self.half_bin
        upper = inv_s * (centered + delta)
        lower = inv_s * (centered - delta)
        zero = torch.zeros((), device=x.device)
        log_p = (
            torch.where(k < last, F.logsigmoid(upper), zero)
            + torch.where(k > 0, F.logsigmoid(-lower), zero)
            + torch.where((k > 0) & (k < last), _log1mexp(2.0 * delta * inv_s), zero)
        )
        return torch.logsumexp(self.log_weights + log_p, dim=-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob_levels(self._levels(x)).sum((-3, -2, -1))

    @property
    def mean(self) -> torch.Tensor:
        """E[x] = E[k] / (L − 1) with E[k] = Σ_{k=1}^{L−1} P(level ≥ k), exactly (not the
        mixture's continuous mean), computed a few levels at a time to bound memory."""
        last = self.num_levels - 1
        weights = self.log_weights.exp().unsqueeze(-1)
        inv_s = torch.exp(-self.log_scales).unsqueeze(-1)
        means = self.means.unsqueeze(-1)
        total = torch.zeros(self.means.shape[:-1], device=self.means.device)
        for start in range(1, last + 1, 16):
            k = torch.arange(start, min(start + 16, last + 1), device=self.means.device, dtype=torch.float32)
            lower = 2.0 * k / last - 1.0 - self.half_bin  # the lower edge of level k
            survival = torch.sigmoid(-(lower - means) * inv_s)  # P(level ≥ k) per component
            total = total + (weights * survival).sum((-2, -1))
        return total / last

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Draw a component, a logistic value from it, and round to the nearest level (the edge
        levels take everything beyond them): an exact draw from the discretized mixture."""
        with torch.no_grad():
            shape = torch.Size(sample_shape)
            comp = _Categorical(logits=self.log_weights, validate_args=False).sample(shape).unsqueeze(-1)
            full = (*shape, *self.means.shape)
            mu = self.means.expand(full).gather(-1, comp).squeeze(-1)
            s = self.log_scales.exp().expand(full).gather(-1, comp).squeeze(-1)
            u = torch.rand(mu.shape, device=mu.device)
            x = mu + s * (torch.log(u) - torch.log1p(-u))
            k = ((x.clamp(-1.0, 1.0) + 1.0) / 2.0 * (self.num_levels - 1)).round()
            return self._to_unit(k)


class DiscretizedLogisticMixture(Likelihood):
    """p(x|z) = Π_d Σ_j π_dj [σ((x̃_d + δ − μ_dj)/s_dj) − σ((x̃_d − δ − μ_dj)/s_dj)],

    the discretized mixture of logistics of PixelCNN++ (Salimans et al. 2017, "PixelCNN++:
    Improving the PixelCNN with Discretized Logistic Mixture Likelihood and Other
    Modifications"), as used by NVAE (Vahdat & Kautz 2020). x̃ = 2x − 1 ∈ [−1, 1] is the data on
    the internal scale, δ = 1/(L − 1) half the distance between levels (1/255 for 8-bit data),
    and the edge levels integrate to the tails: P(0) = σ((−1 + δ − μ)/s),
    P(L−1) = 1 − σ((1 − δ − μ)/s). Every value d has its own K mixture weights π (softmax of
    logits), means μ and log-scales log s, clamped at ≥ −7 as in PixelCNN++: 3K decoder
    channels per data channel.

    **The mixture is per sub-pixel, independent across the colour channels given z**: this
    version has *no* autoregressive coupling of R, G, B within a pixel (PixelCNN++ shares the
    mixture indicator across a pixel's channels and shifts the means of G and B linearly by
    the R and G values); for grey data there is no difference.

    ``log_prob`` is the log-probability of the discrete value (``discrete``), so bits/dim =
    nll / (D ln 2) with no bin-width correction. The data must be the stored intensities, not
    binarized or dequantized (``requires_levels``); ``num_bins`` is L (256 for 8-bit data;
    ``None`` takes the data's number of levels).
    """

    discrete = True
    requires_levels = True
    support = (0.0, 1.0)

    def __init__(self, num_mixtures: int = 10, num_bins: int | None = 256, min_log_scale: float = -7.0):
        super().__init__()
        if isinstance(num_mixtures, bool) or int(num_mixtures) != num_mixtures or num_mixtures < 1:
            raise ValueError(f"likelihood.num_mixtures must be a positive integer, got {num_mixtures!r}")
        self.num_mixtures = int(num_mixtures)
        self.num_levels = _check_levels(num_bins, "likelihood.num_bins")
        self.min_log_scale = float(min_log_scale)

    @property
    def num_bins(self) -> int | None:
        return self.num_levels

    def num_params(self, data_shape: DataShape) -> int:
        return 3 * self.num_mixtures

    def forward(self, params: torch.Tensor) -> Distribution:
        if self.num_levels is None:
            raise RuntimeError(f"{type(self).__name__}: the number of levels is not known yet (set_num_levels)")
        k = self.num_mixtures
        p = torch.stack(self._split(params, 3 * k), dim=-1)  # [*batch, C, H, W, 3K]
        logit_probs, means, log_scales = p[..., :k], p[..., k : 2 * k], p[..., 2 * k :]
        return LogisticMixtureLevels(logit_probs, means, log_scales.clamp(min=self.min_log_scale), self.num_levels)
