"""Encoder and decoder networks (plain torch).

Encoders map x ``[N, C, H, W]`` to a feature vector ``[N, out_features]``, which the posterior
turns into q(z|x). Decoders map z ``[*S, N, latent_dim]`` to distribution parameters
``[*S, N, out_channels, H, W]``, which the likelihood turns into p(x|z), keeping z's leading
sample dimensions ``S`` (the objectives decode K samples of each example at once; the build
checks it: ``vaelab.build._check_shapes``). ``out_features`` and
``out_channels`` are filled in by ``vaelab.build`` from the posterior and the likelihood, so a
network config never repeats them (the YAML files are ``_partial_``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from vaelab.errors import SettingError
from vaelab.options import ACTIVATIONS
from vaelab.validation import are_widths

#: (the names are ``vaelab.options.ACTIVATIONS``, which the config check reads before torch loads)
_ACTIVATIONS: dict[str, type[nn.Module]] = dict(zip(
    ACTIVATIONS, (nn.ReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.LeakyReLU, nn.Softplus), strict=True))


def activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise SettingError(
            f"activation {name!r} is not known: choose one of {sorted(_ACTIVATIONS)}"
        ) from None


_act = activation  # for classes whose ``activation`` argument shadows the function


def _check_shape(data_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in data_shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"data_shape must be (C, H, W) with positive sizes, got {data_shape}")
    return shape  # type: ignore[return-value]


def _widths(hidden: Sequence[int], what: str) -> list[int]:
    if not are_widths(hidden):
        raise SettingError(f"{what} must be a list of positive layer widths, got {hidden!r} (e.g. {what}=[512,512])")
    return [int(h) for h in hidden]


def _mlp(sizes: Sequence[int], act: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation(act))
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """x → flatten → [Linear → act] × len(hidden) → Linear(out_features)."""

    def __init__(
        self,
        data_shape: Sequence[int],
        out_features: int,
        hidden: Sequence[int] = (512, 256),
        activation: str = "relu",
    ):
        super().__init__()
        self.data_shape = _check_shape(data_shape)
        self.net = _mlp([math.prod(self.data_shape), *_widths(hidden, "encoder.hidden"), out_features], activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(start_dim=-3))


class MLPDecoder(nn.Module):
    """z → [Linear → act] × len(hidden) → Linear(out_channels·H·W) → [out_channels, H, W]."""

    def __init__(
        self,
        latent_dim: int,
        data_shape: Sequence[int],
        out_channels: int,
        hidden: Sequence[int] = (256, 512),
        activation: str = "relu",
    ):
        super().__init__()
        _, h, w = _check_shape(data_shape)
        self.out_shape = (int(out_channels), h, w)
        self.net = _mlp([int(latent_dim), *_widths(hidden, "decoder.hidden"), math.prod(self.out_shape)], activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # any leading dimensions (the objectives' samples [S, B, Z]) through the layers as one
        # [N, Z] matrix, as ConvDecoder does: a Linear on 2-D input is one addmm, without the
        # views that fold and unfold the extra dimension forward and back (14 operations a
        # training step for S = 1)
        lead = z.shape[:-1]
        return self.net(z.reshape(-1, z.shape[-1])).reshape(*lead, *self.out_shape)


def _spatial_sizes(size: int, depth: int) -> list[int]:
    """Sizes after each stride-2 convolution with kernel 3 and padding 1: ceil(s / 2)."""
    sizes = [size]
    for _ in range(depth):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def _to_channels_last(module: nn.Module, enabled: bool) -> bool:
    """Store the 4-D (convolution) weights channels-last (NHWC), the layout that oneDNN on a
    CPU and cuDNN on a GPU run fastest: ~15-20% less time per training step for the conv VAE
    on this project's CPU benchmark. Only the memory layout changes: values, shapes, the
    order of ``flatten`` and the checkpoint keys are the same either way."""
    if enabled:
        module.to(memory_format=torch.channels_last)
    return bool(enabled)


def _channels_last(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if enabled else x


class ConvEncoder(nn.Module):
    """x → [Conv 3×3 stride 2 → act] per entry of ``channels`` → flatten → Linear(out_features).

    Works for any image size: each convolution halves H and W (rounding up).
    ``channels_last``: run the convolutions in the NHWC memory layout (faster; same result).
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        out_features: int,
        channels: Sequence[int] = (32, 64, 128),
        activation: str = "relu",
        channels_last: bool = True,
    ):
        super().__init__()
        c, h, w = _check_shape(data_shape)
        chans = _widths(channels, "encoder.channels")
        if not chans:
            raise SettingError("encoder.channels needs at least one convolution")
        layers: list[nn.Module] = []
        for a, b in zip([c, *chans[:-1]], chans, strict=True):
            layers += [nn.Conv2d(a, b, kernel_size=3, stride=2, padding=1), _act(activation)]
        self.features = nn.Sequential(*layers)
        hs, ws = _spatial_sizes(h, len(chans))[-1], _spatial_sizes(w, len(chans))[-1]
        self.head = nn.Linear(chans[-1] * hs * ws, out_features)
        self.channels_last = _to_channels_last(self, channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-3]
        h = self.features(_channels_last(x.reshape(-1, *x.shape[-3:]), self.channels_last))
        return self.head(h.flatten(start_dim=1)).reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """z → Linear → [channels[0], h, w] → [ConvTranspose 3×3 stride 2 → act] per entry of
    ``channels`` → Conv 3×3 → [out_channels, H, W].

    The transposed convolutions retrace the encoder's sizes exactly (their output padding is
    chosen per layer), so 28×28, 32×32, 8×8 or any other size comes out without cropping.
    ``channels_last``: run the convolutions in the NHWC memory layout (faster; same result).
    """

    def __init__(
        self,
        latent_dim: int,
        data_shape: Sequence[int],
        out_channels: int,
        channels: Sequence[int] = (128, 64, 32),
        activation: str = "relu",
        channels_last: bool = True,
    ):
        super().__init__()
        _, h, w = _check_shape(data_shape)
        chans = _widths(channels, "decoder.channels")
        if not chans:
            raise SettingError("decoder.channels needs at least one transposed convolution")
        hs, ws = _spatial_sizes(h, len(chans)), _spatial_sizes(w, len(chans))
        self.start = (chans[0], hs[-1], ws[-1])
        self.project = nn.Sequential(nn.Linear(int(latent_dim), math.prod(self.start)), _act(activation))
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(chans, [*chans[1:], chans[-1]], strict=True)):
            # output = 2·in − 1 + output_padding: pick the padding that lands on the encoder's size
            src = (hs[-1 - i], ws[-1 - i])
            dst = (hs[-2 - i], ws[-2 - i])
            pad = tuple(d - (2 * s - 1) for s, d in zip(src, dst, strict=True))
            layers += [
                nn.ConvTranspose2d(a, b, kernel_size=3, stride=2, padding=1, output_padding=pad),
                _act(activation),
            ]
        layers.append(nn.Conv2d(chans[-1], int(out_channels), kernel_size=3, padding=1))
        self.net = nn.Sequential(*layers)
        self.channels_last = _to_channels_last(self, channels_last)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = self.project(z.reshape(-1, z.shape[-1])).unflatten(-1, self.start)
        out = self.net(_channels_last(h, self.channels_last))
        return out.reshape(*lead, *out.shape[1:])

