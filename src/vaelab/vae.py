"""The VAE as plain torch: the generative model p(z) p(x|z) and the inference model q(z|x).

    p(x) = ∫ p(x|z) p(z) dz                 (intractable)
    q(z|x) ≈ p(z|x)                         (the encoder's amortized approximation)
    log p(x) ≥ IWAE_K(x) ≥ ELBO(x) = IWAE_1(x)

No Lightning, Hydra or W&B here: this module can be read, tested and reused on its own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.distributions import Distribution, kl_divergence

from vaelab.likelihoods import Likelihood
from vaelab.posteriors import Posterior
from vaelab.precision import upcast
from vaelab.priors import Prior

_NO_SWITCH = contextlib.nullcontext()


def float32(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Run density arithmetic in float32 even inside an autocast (mixed precision) region.
    Outside one (full precision) there is nothing to switch off: a shared null context, which
    saves the training step entering and leaving eight autocast regions (or generators)."""
    if not torch.is_autocast_enabled(device.type):
        return _NO_SWITCH
    return torch.autocast(device_type=device.type, enabled=False)


def rsample_and_log_prob(
    q: Distribution, sample_shape: torch.Size | tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reparameterized samples z ~ q and, where q computes it in the same pass, log q(z).

    Flows such as IAF (``vaelab.posteriors.IAF``) provide ``rsample_and_log_prob``: their log q
    of their own samples comes from the sampling pass, exactly and without inverting the flow.
    Other distributions return ``(q.rsample(shape), None)``; the caller evaluates
    ``q.log_prob(z)`` if it needs it (as before, so the diagonal Gaussian is unchanged).
    """
    if hasattr(q, "rsample_and_log_prob"):
        return q.rsample_and_log_prob(torch.Size(sample_shape))
    return q.rsample(torch.Size(sample_shape)), None


def kl_or_monte_carlo(
    q: Distribution,
    p: Distribution,
    z: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, bool]:
    """KL(q ‖ p) per example, and whether it was analytic.

    Analytic (``torch.distributions.kl_divergence``) exactly when torch registers the pair of
    distribution types; otherwise the Monte Carlo estimate mean_s[log q(z_s) − log p(z_s)]
    over the samples ``z`` ``[S, *batch, Z]`` that the reconstruction term used, which keeps
    the ELBO estimate unbiased. ``log_q`` ``[S, *batch]``, if given, is log q(z_s) as computed
    when sampling (``rsample_and_log_prob``); else ``q.log_prob(z)`` is evaluated.
    """
    try:
        return kl_divergence(q, p), True
    except NotImplementedError:
        if z is None:
            raise ValueError(
                f"KL({type(q).__name__} ‖ {type(p).__name__}) has no closed form in "
                "torch.distributions; pass samples z for a Monte Carlo estimate"
            ) from None
        if log_q is None:
            log_q = q.log_prob(z)
        return (log_q - p.log_prob(z)).mean(0), False


def pass_plan(
    shape: torch.Size | tuple[int, ...], num_samples: int, chunk_size: int, pass_size: int | None = None
) -> tuple[int, int]:
    """How ``VAE.log_likelihood`` splits data of ``shape`` ``[*batch, C, H, W]``: the samples
    drawn for each example at a time (``chunk``) and the leading-dimension rows of the batch
    that go through together (``rows``; all of them without a ``pass_size``), so that one
    forward pass holds at most ``pass_size`` samples, or ``chunk`` where one row alone needs more."""
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(f"need num_samples >= 1 and chunk_size >= 1, got {num_samples}, {chunk_size}")
    if pass_size is not None and pass_size < 1:
        raise ValueError(f"need pass_size >= 1 (or None), got {pass_size}")
    chunk = min(chunk_size, num_samples)
    if len(shape) <= 3:  # one example
        return (chunk if pass_size is None else min(chunk, pass_size)), 1
    if pass_size is None:
        return chunk, int(shape[0])
    chunk = min(chunk, pass_size)
    per_row = chunk * math.prod(shape[1:-3])  # samples a leading-dimension row adds to a pass
    return chunk, min(int(shape[0]), max(1, pass_size // per_row))


def largest_pass(shape: torch.Size | tuple[int, ...], num_samples: int, chunk_size: int,
                 pass_size: int | None = None) -> int:
    """The samples in the largest forward pass of ``VAE.log_likelihood`` on data of ``shape``."""
    chunk, rows = pass_plan(shape, num_samples, chunk_size, pass_size)
    return chunk * rows * (math.prod(shape[1:-3]) if len(shape) > 3 else 1)


class VAE(nn.Module):
    """Composes the five parts; every method returns distributions or per-example nats."""

    def __init__(
        self,
        encoder: nn.Module,
        posterior: Posterior,
        decoder: nn.Module,
        likelihood: Likelihood,
        prior: Prior,
    ):
        super().__init__()
        self.encoder = encoder
        self.posterior = posterior
        self.decoder = decoder
        self.likelihood = likelihood
        self.prior = prior

    @property
    def latent_dim(self) -> int:
        return self.prior.latent_dim

    # the three distributions ---------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Distribution:
        """q(z|x): batch shape ``x.shape[:-3]``, event shape ``(latent_dim,)``."""
        h = self.encoder(x)
        with float32(x.device):
            return self.posterior(h)

    def decode(self, z: torch.Tensor) -> Distribution:
        """p(x|z): batch shape ``z.shape[:-1]``, event shape = the data shape."""
        params = self.decoder(z)
        with float32(z.device):
            return self.likelihood(params)

    def prior_distribution(self) -> Distribution:
        """p(z): event shape ``(latent_dim,)``."""
        return self.prior()

    # sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, num_samples: int) -> Distribution:
        """p(x|z) for z ~ p(z): ``.mean`` gives the expected image, ``.sample()`` a draw."""
        z = self.prior_distribution().sample((num_samples,))
        return self.decode(z)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> Distribution:
        """p(x|z) at z = the mean of q(z|x)."""
        return self.decode(self.encode(x).mean)

    # bounds on log p(x) ----------------------------------------------------------------------
    def log_importance_weights(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """log w_k = log p(x|z_k) + log p(z_k) − log q(z_k|x), z_k ~ q(z|x): shape ``[K, B]``."""
        q = self.encode(x)
        return self._log_weights(q, x, num_samples)

    def _log_weights(self, q: Distribution, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        with float32(x.device):  # a flow's networks run while sampling: keep them in fp32
            z, log_q = rsample_and_log_prob(q, (num_samples,))
        px = self.decode(z)
        with float32(x.device):
            z = upcast(z)
            if log_q is None:
                log_q = q.log_prob(z)
            return px.log_prob(x) + self.prior_distribution().log_prob(z) - upcast(log_q)

    @torch.no_grad()
    def log_likelihood(
        self, x: torch.Tensor, num_samples: int = 1000, chunk_size: int = 500, pass_size: int | None = None,
        between: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """Importance-sampled estimate of log p(x) per example (nats), ``[B]``.

        log p(x) ≈ log 1/K Σ_k p(x|z_k) p(z_k) / q(z_k|x),  z_k ~ q(z|x)

        (Burda et al. 2015). It is the IWAE bound IWAE_K, so it never exceeds log p(x) in
        expectation and tightens as K grows. The K samples are drawn ``chunk_size`` at a time and
        combined with a running log-sum-exp, so memory does not grow with K. ``pass_size``
        (None: no bound) bounds the samples of one forward pass over all the examples
        together: the examples go through in groups of ``pass_size // chunk`` (at least one;
        one example alone takes at most ``pass_size`` samples a pass), so memory does not grow
        with the batch either (``pass_plan``). The same estimate either way, drawn in another
        order. ``between`` is called before each forward pass (it may raise to stop: a run told to
        stop does not finish a long evaluation first).
        """
        chunk, rows = pass_plan(x.shape, num_samples, chunk_size, pass_size)
        if x.dim() > 3 and rows < x.shape[0]:
            return torch.cat([self.log_likelihood(part, num_samples, chunk, between=between) for part in x.split(rows)])
        q = self.encode(x)
        total = torch.full(x.shape[:-3], -math.inf, device=x.device)
        done = 0
        while done < num_samples:
            if between is not None:
                between()
            k = min(chunk, num_samples - done)
            with float32(x.device):
                total = torch.logaddexp(total, torch.logsumexp(self._log_weights(q, x, k), dim=0))
            done += k
        return total - math.log(num_samples)
