"""Priors p(z): an ``nn.Module`` whose call returns a Distribution with event shape
``(latent_dim,)``.

Priors are modules (not bare distributions) so that their parameters and buffers move with
the model between devices, are saved in checkpoints, and, for learned priors, are trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    Normal,
    register_kl,
)
from torch.distributions.kl import _kl_independent_independent

from vaelab.options import FLOW_PRIORS, VAMP_COMPONENTS, VAMP_SQUASHES
from vaelab.precision import upcast


class Prior(nn.Module):
    """Base class of the priors p(z)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        latent_dim = int(latent_dim)
        if latent_dim <= 0:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")
        self.latent_dim = latent_dim

    def bind(self, vae: nn.Module, data_shape: Sequence[int]) -> None:
        """Called by ``vaelab.build.build_vae`` once the VAE around this prior is built.

        A no-op here; priors that depend on the rest of the model (the VampPrior uses the
        encoder and the data shape) override it. Keep references to ``vae`` out of the
        registered submodules, or its parameters would be counted and saved twice.
        """

    def forward(self) -> Distribution:
        raise NotImplementedError


class StandardNormalDistribution(Independent):
    """``Independent(Normal(0, 1), 1)`` that knows its parameters are 0 and 1, so that its
    log-density and its KL from a diagonal Gaussian skip the arithmetic with them:

        log p(z) = −½ ‖z‖² − (Z/2) log 2π
        KL(N(μ, diag σ²) ‖ N(0, I)) = Σ_d [½ (μ_d² + σ_d²) − log σ_d] − Z/2

    (Kingma & Welling 2014, appendix B). Everything else is ``Independent(Normal)``'s.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z = self.event_shape[-1]
        if value.shape[-1] != z:  # (torch's Normal would broadcast a last dimension of 1)
            raise ValueError(f"log p(z) of the standard normal prior needs z with {z} dimensions, "
                             f"got shape {tuple(value.shape)}")
        return -0.5 * value.square().sum(-1) - 0.5 * z * math.log(2 * math.pi)


@register_kl(Independent, StandardNormalDistribution)
def _kl_diagonal_standard_normal(q: Independent, p: StandardNormalDistribution) -> torch.Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) in closed form (see ``StandardNormalDistribution``);
    any other ``Independent`` q goes to torch's rule for two ``Independent``s."""
    if not (type(q.base_dist) is Normal and q.reinterpreted_batch_ndims == 1 and q.event_shape == p.event_shape):
        return _kl_independent_independent(q, p)
    loc, scale = q.base_dist.loc, q.base_dist.scale
    return (0.5 * (loc.square() + scale.square()) - scale.log()).sum(-1) - 0.5 * q.event_shape[-1]


class StandardNormal(Prior):
    """p(z) = N(z; 0, I), the prior of Kingma & Welling (2014).

    Returned as ``Independent(Normal(0, 1), 1)`` (a ``StandardNormalDistribution``), so
    ``kl_divergence`` with a diagonal Gaussian posterior is analytic. The distribution is made
    once and handed out again while the buffers are the same tensors (they change only when
    the module moves to another device or dtype).
    """

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        self.register_buffer("loc", torch.zeros(self.latent_dim), persistent=False)
        self.register_buffer("scale", torch.ones(self.latent_dim), persistent=False)
        self._made: tuple[torch.Tensor, torch.Tensor, Distribution] | None = None

    def forward(self) -> Distribution:
        made = self._made
        if made is None or made[0] is not self.loc or made[1] is not self.scale:
            base = Normal(upcast(self.loc), upcast(self.scale), validate_args=False)
            dist = StandardNormalDistribution(base, 1, validate_args=False)
            made = self._made = (self.loc, self.scale, dist)
        return made[2]


class LearnedGaussian(Prior):
    """p(z) = N(z; μ, diag σ²) with a learned mean μ and log-scale log σ, per latent dimension.

        log p(z) = Σ_d [ −½ ((z_d − μ_d)/σ_d)² − log σ_d − ½ log 2π ]

    The empirical-Bayes version of the Gaussian prior of Kingma & Welling (2014), "Auto-Encoding
    Variational Bayes". Returned as ``Independent(Normal(μ, σ), 1)``, so the KL with a diagonal
    Gaussian posterior stays analytic. Initialized at N(0, I). It adds little expressiveness
    (a decoder that starts with a linear layer absorbs an affine map of z); it is a baseline
    and a sanity check for learned priors.
    """

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        self.loc = nn.Parameter(torch.zeros(self.latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(self.latent_dim))

    def forward(self) -> Distribution:
        return Independent(Normal(upcast(self.loc), upcast(self.log_scale).exp(), validate_args=False), 1)


class MixtureOfGaussians(Prior):
    """p(z) = Σ_k π_k N(z; μ_k, diag σ_k²), K learned diagonal Gaussians with learned weights.

        log p(z) = logsumexp_k [ log π_k + Σ_d log N(z_d; μ_kd, σ_kd²) ],  π = softmax(logits)

    The mixture-of-Gaussians prior that Tomczak & Welling (2018), "VAE with a VampPrior",
    discuss as the simplest approximation of the aggregated posterior; cf. Dilokthanakul et al.
    (2016), "Deep Unsupervised Clustering with Gaussian Mixture Variational Autoencoders". The KL with q(z|x) has no closed form,
    so the ELBO uses the Monte Carlo estimate on the reparameterized samples.

    Init: equal weights, unit scales, and means drawn from N(0, ``init_spread``² I) so that the
    components start apart (identical components would receive identical gradients forever).
    """

    def __init__(self, latent_dim: int, num_components: int = 10, init_spread: float = 1.0):
        super().__init__(latent_dim)
        num_components = int(num_components)
        if num_components < 1:
            raise ValueError(f"prior.num_components must be >= 1, got {num_components}")
        if not float(init_spread) >= 0:
            raise ValueError(f"prior.init_spread must be >= 0, got {init_spread}")
        self.num_components = num_components
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.loc = nn.Parameter(float(init_spread) * torch.randn(num_components, self.latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(num_components, self.latent_dim))

    def forward(self) -> Distribution:
        components = Independent(
            Normal(upcast(self.loc), upcast(self.log_scale).exp(), validate_args=False), 1
        )
        return MixtureSameFamily(
            Categorical(logits=upcast(self.logits), validate_args=False), components, validate_args=False
        )


class VampPrior(Prior):
    """The VampPrior of Tomczak & Welling (2018), "VAE with a VampPrior" (AISTATS):

        p(z) = 1/K Σ_k q(z | u_k)

    a uniform mixture of the model's own variational posterior evaluated at K learned
    pseudo-inputs u_k of the data's shape. With the diagonal Gaussian posterior each component
    is N(z; μ(u_k), diag σ²(u_k)); any posterior whose q(z|x) has event shape ``(latent_dim,)``
    works, since the mixture only needs the components' ``log_prob`` and ``sample``. The KL
    has no closed form (Monte Carlo in the ELBO).

    The pseudo-inputs are u_k = hardtanh(w_k) ∈ [0, 1] (the paper's code), w_k initialized from
    N(``init_mean``, ``init_std``²) (the paper's MNIST setting is 0.05 and 0.01); ``squash``
    ``sigmoid`` (u = sigmoid(w); hardtanh passes no gradient to a w_k once it leaves [0, 1]) or
    ``none`` are the alternatives. Evaluating p(z) encodes all K pseudo-inputs (once per
    ``prior_distribution()`` call), and log p(z) costs K component densities per z.

    With a flow posterior (``posterior=iaf``: z = g(z0), z0 ~ q0(z0|x)) a component's density
    q(z|u_k) runs the flow's inverse, Z sequential passes per transform, for every pair of a z
    and a pseudo-input: a training step of ``experiment=vampprior_mnist``'s model took ~200× as
    long as with the Gaussian posterior, and 14 GiB (``benchmarks/vamp_iaf.py``).
    ``components: base`` makes the components the flow's base Gaussians, p(z) = 1/K Σ_k
    q0(z|u_k): one pass, as with the diagonal Gaussian posterior. The prior is then a mixture of
    Gaussians placed by the encoder at the pseudo-inputs, no longer the flow posterior's own
    aggregate; the default, ``posterior``, is the paper's definition (and warns of the cost).
    For a posterior that is not a flow the two are the same.

    The encoder is needed, so the prior is bound to its VAE after the VAE is built
    (``vaelab.build.build_vae`` calls ``prior.bind(vae, data_shape)``). The prior keeps the
    VAE's bound ``encode`` method as a plain attribute, not the encoder as a submodule: the
    encoder's parameters are then counted, optimized and saved once (under ``encoder.``), and
    the module tree has no cycle. A bound method (not a weak reference) so that
    ``copy.deepcopy`` of the VAE rebinds the copy's prior to the copy's encoder, and pickling
    works. The pseudo-inputs are created at bind time, when the data shape is known.
    """

    SQUASHES = VAMP_SQUASHES
    COMPONENTS = VAMP_COMPONENTS

    def __init__(
        self,
        latent_dim: int,
        num_components: int = 500,
        init_mean: float = 0.05,
        init_std: float = 0.01,
        squash: str = "hardtanh",
        components: str = "posterior",
    ):
        super().__init__(latent_dim)
        num_components = int(num_components)
        if num_components < 1:
            raise ValueError(f"prior.num_components must be >= 1, got {num_components}")
        if squash not in self.SQUASHES:
            raise ValueError(f"prior.squash must be one of {self.SQUASHES}, got {squash!r}")
        if not float(init_std) >= 0:
            raise ValueError(f"prior.init_std must be >= 0, got {init_std}")
        if components not in self.COMPONENTS:
            raise ValueError(f"prior.components must be one of {self.COMPONENTS}, got {components!r}")
        self.components = components
        self.num_components = num_components
        self.init_mean = float(init_mean)
        self.init_std = float(init_std)
        self.squash = squash
        self.register_parameter("pseudo_inputs_raw", None)  # created by bind(), data shape known
        self._encode: Callable[[torch.Tensor], Distribution] | None = None

    def bind(self, vae: nn.Module, data_shape: Sequence[int]) -> None:
        """Use ``vae.encode`` as q(z|x) and create K pseudo-inputs of shape ``data_shape``."""
        data_shape = tuple(int(s) for s in data_shape)
        if self.pseudo_inputs_raw is None or tuple(self.pseudo_inputs_raw.shape[1:]) != data_shape:
            like = next(iter(vae.parameters()), None)
            device = like.device if like is not None else None
            w = self.init_mean + self.init_std * torch.randn(self.num_components, *data_shape, device=device)
            if self.squash == "sigmoid":  # so that sigmoid(w) ~ N(init_mean, init_std²)
                w = torch.logit(w.clamp(1e-3, 1 - 1e-3))
            self.pseudo_inputs_raw = nn.Parameter(w)
        self._encode = vae.encode  # a bound method: a plain attribute, not a submodule
        posterior = getattr(vae, "posterior", None)
        if self.components == "posterior" and getattr(posterior, "sequential_log_prob", False):
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"prior=vamp over the {type(posterior).__name__} posterior: each log p(z) = log 1/K Σ_k q(z|u_k) runs the "
                f"flow's inverse (sequential over the {self.latent_dim} latent dimensions) for every z and each of the "
                f"K={self.num_components} pseudo-inputs, and its memory grows with batch × K: a training step of "
                "experiment=vampprior_mnist's model took 9.8 s and 14 GiB on a 2-core CPU, against 0.05 s and 0.8 GiB "
                "with prior.components=base, which mixes the flow's base Gaussians q0(z|u_k) instead "
                "(benchmarks/vamp_iaf.py)"
            )

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        """u_k, ``[K, *data_shape]``."""
        if self.pseudo_inputs_raw is None:
            raise RuntimeError(
                "VampPrior is not bound to a VAE: call prior.bind(vae, data_shape) "
                "(vaelab.build.build_vae does this)"
            )
        w = self.pseudo_inputs_raw
        if self.squash == "hardtanh":
            return nn.functional.hardtanh(w, 0.0, 1.0)
        if self.squash == "sigmoid":
            return torch.sigmoid(w)
        return w

    def forward(self) -> Distribution:
        u = self.pseudo_inputs
        if self._encode is None:
            raise RuntimeError("VampPrior has pseudo-inputs but no encoder: call prior.bind(vae, data_shape)")
        q = self._encode(u)
        k, z = self.num_components, self.latent_dim
        if tuple(q.batch_shape) != (k,) or tuple(q.event_shape) != (z,):
            raise ValueError(
                f"VampPrior needs q(z|x) with batch shape [K] and event shape [latent_dim] for "
                f"pseudo-inputs of shape {tuple(u.shape)}; the posterior "
                f"{type(q).__name__} gives batch {tuple(q.batch_shape)}, event {tuple(q.event_shape)}"
            )
        if self.components == "base":
            q = getattr(q, "base", q)  # a flow's (zuko's NormalizingFlow) base distribution q0(z|u_k)
        weights = Categorical(logits=torch.zeros(k, device=u.device), validate_args=False)
        return MixtureSameFamily(weights, q, validate_args=False)


class Flow(Prior):
    """A normalizing-flow prior: z = f⁻¹(ε), ε ~ N(0, I), with f a learned bijection (zuko):

        log p(z) = log N(f(z); 0, I) + log |det ∂f(z)/∂z|

    ``flow: maf`` — masked autoregressive flow, Papamakarios et al. (2017), "Masked
    Autoregressive Flow for Density Estimation"; ``flow: nsf`` — neural spline flow, Durkan et
    al. (2019), "Neural Spline Flows". Flow priors for VAEs: e.g. Chen et al. (2017), "Variational
    Lossy Autoencoder". f runs in the density direction, so log p(z) (every training step) is
    one network pass; sampling (pictures only) inverts f, sequentially over the dimensions for
    the autoregressive flows. The KL has no closed form (Monte Carlo in the ELBO).

    ``transforms`` stacked autoregressive transforms, each an MLP with ``hidden_features``;
    further keyword arguments go to the zuko flow (e.g. ``bins`` for NSF, ``randperm``).
    """

    FLOWS = FLOW_PRIORS

    def __init__(
        self,
        latent_dim: int,
        flow: str = "maf",
        transforms: int = 3,
        hidden_features: Sequence[int] = (64, 64),
        **flow_kwargs: Any,
    ):
        super().__init__(latent_dim)
        import zuko  # imported here, so that the other priors do not need zuko

        if flow not in self.FLOWS:
            raise ValueError(f"prior.flow must be one of {self.FLOWS}, got {flow!r}")
        if int(transforms) < 1:
            raise ValueError(f"prior.transforms must be >= 1, got {transforms}")
        hidden = tuple(int(h) for h in hidden_features)
        if not all(h > 0 for h in hidden):
            raise ValueError(f"prior.hidden_features must be positive widths, got {list(hidden_features)}")
        cls = {"maf": zuko.flows.MAF, "nsf": zuko.flows.NSF}[flow]
        self.flow = cls(
            features=self.latent_dim, context=0, transforms=int(transforms), hidden_features=hidden,
            **dict(flow_kwargs),
        )

    def forward(self) -> Distribution:
        return self.flow()
