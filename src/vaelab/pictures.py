"""The pictures a researcher looks at, as image tensors ``[3, H, W]`` in [0, 1]: grids of
decoded images (torchvision ``make_grid``) and plots (matplotlib, Agg backend, rendered to
pixels at a fixed size). ``vaelab.callbacks`` logs them to W&B and writes them as PNG files.

No Lightning or W&B here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.utils import make_grid

#: plots are rendered at this size (inches) and dpi: 640 × 480 pixels
FIGSIZE = (6.4, 4.8)
DPI = 100


def upscale(images: torch.Tensor, min_size: int) -> torch.Tensor:
    """Nearest-neighbour upscaling by a whole factor, so that 8×8 digits are visible in a
    dashboard: each pixel repeated ``factor`` times along each axis (``F.interpolate``'s
    nearest mode gives the same pixels, in ~5× the time)."""
    factor = max(1, -(-min_size // images.shape[-1]))
    if factor == 1:
        return images
    n, c, h, w = images.shape
    return images[:, :, :, None, :, None].expand(n, c, h, factor, w, factor).reshape(n, c, h * factor, w * factor)


def displayable(images: torch.Tensor) -> torch.Tensor:
    return images.float().clamp(0.0, 1.0).cpu()


def save_png(image: torch.Tensor, path: Any, compress_level: int = 1) -> None:
    """Write a picture ``[3, H, W]`` (or ``[1, H, W]``) in [0, 1] as a PNG file, with the pixels
    of torchvision's ``save_image`` (×255, rounded); as one grey channel where the three are
    equal (grey data: ``make_grid`` copies the one channel three times), and with zlib's
    fastest level: a third of ``save_image``'s time for the grids drawn every epoch, in files
    ~10 % larger."""
    to_pil(image).save(path, format="PNG", compress_level=compress_level)


def to_pil(image: torch.Tensor) -> Any:
    """A picture ``[3, H, W]`` (or ``[1, H, W]``) in [0, 1] as a PIL image of ``save_png``'s pixels."""
    from PIL import Image

    pixels = image.detach().mul(255).add_(0.5).clamp_(0, 255).to("cpu", torch.uint8)
    if pixels.shape[0] == 3 and torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2]):
        pixels = pixels[:1]
    array = pixels[0].numpy() if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def grid(images: torch.Tensor, nrow: int, min_pixels: int = 32) -> torch.Tensor:
    """Images ``[N, C, H, W]`` in rows of ``nrow``, upscaled, 2-pixel grey padding."""
    return make_grid(upscale(displayable(images), min_pixels), nrow=nrow, padding=2, pad_value=0.5)


@torch.no_grad()
def traversals(vae: Any, z0: torch.Tensor, dims: Sequence[int], centre: torch.Tensor, spread: torch.Tensor,
               steps: int = 9, extent: float = 3.0) -> torch.Tensor:
    """The mean of p(x|z) as z moves along each of ``dims`` (one row per dimension):
    z_u = centre_u + t · spread_u, t ∈ [−extent, extent], the other dimensions fixed at ``z0``.
    Returns ``[len(dims) * steps, C, H, W]``."""
    t = torch.linspace(-extent, extent, steps, device=z0.device)
    rows = []
    for u in dims:
        z = z0.expand(steps, -1).clone()
        z[:, u] = centre[u] + t * spread[u]
        rows.append(vae.decode(z).mean)
    return torch.cat(rows)


@torch.no_grad()
def interpolations(vae: Any, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """Per pair (a row): x_a, the mean of p(x|z) along the straight line between the means of
    q(z|x_a) and q(z|x_b) (both ends included, ``steps`` points), then x_b.
    Returns ``[pairs * (steps + 2), C, H, W]``."""
    from vaelab.diagnostics import posterior_mean

    za, zb = posterior_mean(vae.encode(x_a)), posterior_mean(vae.encode(x_b))
    t = torch.linspace(0.0, 1.0, steps, device=za.device)[None, :, None]
    z = (1 - t) * za[:, None] + t * zb[:, None]  # [pairs, steps, Z]
    decoded = vae.decode(z.reshape(-1, z.shape[-1])).mean.reshape(len(za), steps, *x_a.shape[1:])
    rows = torch.cat([x_a[:, None], decoded.to(x_a.dtype), x_b[:, None]], dim=1)
    return rows.reshape(-1, *x_a.shape[1:])


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    return Figure(figsize=FIGSIZE, dpi=DPI)


def _render(fig: Any) -> torch.Tensor:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255.0


def project_2d(means: torch.Tensor) -> tuple[np.ndarray, str, str]:
    """The latent means themselves when Z = 2 (or 1: padded with zeros), else their first two
    principal components (scikit-learn PCA). Returns points and the axis labels."""
    m = means.detach().double().cpu().numpy()
    if m.shape[1] == 2:
        return m, "z_0", "z_1"
    if m.shape[1] == 1:
        return np.concatenate([m, np.zeros_like(m)], axis=1), "z_0", "(none)"
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=0).fit(m)
    ratio = pca.explained_variance_ratio_
    return pca.transform(m), f"PC 1 ({100 * ratio[0]:.0f}% of variance)", f"PC 2 ({100 * ratio[1]:.0f}%)"


def latent_scatter(means: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The test set encoded (means of q(z|x)), coloured by class when labels are known."""
    points, xlabel, ylabel = project_2d(means)
    fig = _figure()
    ax = fig.add_subplot()
    labels_np = None if labels is None else labels.cpu().numpy()
    if labels_np is not None and (labels_np >= 0).any():
        sc = ax.scatter(points[:, 0], points[:, 1], c=labels_np, cmap="tab10", s=6, alpha=0.8)
        fig.colorbar(sc, ax=ax, label="class")
    else:
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.8, color="tab:blue")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("test set in latent space: means of q(z|x)" + (" (PCA)" if means.shape[1] > 2 else ""))
    return _render(fig)


def kl_bars(kl_per_dim: Sequence[float], active: Sequence[bool]) -> torch.Tensor:
    """KL(q(z_u|x) ‖ p(z_u)) per dimension u, averaged over the test set; active units darker."""
    fig = _figure()
    ax = fig.add_subplot()
    colours = ["tab:blue" if a else "lightgray" for a in active]
    ax.bar(range(len(kl_per_dim)), kl_per_dim, color=colours)
    ax.set_xlabel("latent dimension u (grey: inactive)")
    ax.set_ylabel("KL(q(z_u|x) ‖ p(z_u))  [nats]")
    ax.set_title(f"KL per latent dimension, test mean (total {sum(kl_per_dim):.2f} nats)")
    return _render(fig)


def rate_distortion(epochs: Sequence[int], rate: Sequence[float], distortion: Sequence[float]) -> torch.Tensor:
    """One point per epoch: rate = val/kl (nats), distortion = −val/recon (nats)."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(rate, distortion, "-o", markersize=3, color="tab:blue")
    for e, r, d in zip(epochs, rate, distortion, strict=True):
        if e in (epochs[0], epochs[-1]) or len(epochs) <= 12:
            ax.annotate(str(e), (r, d), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("rate: KL(q(z|x) ‖ p(z))  [nats]  (val/kl)")
    ax.set_ylabel("distortion: −E_q[log p(x|z)]  [nats]  (−val/recon)")
    ax.set_title("rate–distortion per epoch (labels: epoch); ELBO = −(rate + distortion)")
    return _render(fig)
