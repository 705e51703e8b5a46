"""Encoders and decoders produce exactly the shapes the posterior and likelihood need."""

import pytest
import torch

from vaelab.networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 7, 11)])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("params_per_value", [1, 2])
def test_round_trip_shapes(shape, kind, params_per_value):
    enc_cls, dec_cls = (MLPEncoder, MLPDecoder) if kind == "mlp" else (ConvEncoder, ConvDecoder)
    enc = enc_cls(shape, out_features=10)
    dec = dec_cls(5, shape, out_channels=params_per_value * shape[0])
    x = torch.rand(3, *shape)
    assert enc(x).shape == (3, 10)
    assert dec(torch.randn(3, 5)).shape == (3, params_per_value * shape[0], *shape[1:])
    # leading sample dimensions [S, B, ...] pass through
    assert dec(torch.randn(4, 3, 5)).shape == (4, 3, params_per_value * shape[0], *shape[1:])


def test_unknown_activation_names_the_options():
    with pytest.raises(ValueError, match="relu"):
        MLPEncoder((1, 8, 8), 4, activation="swishy")


def test_bad_widths_are_refused():
    with pytest.raises(ValueError, match="positive"):
        MLPEncoder((1, 8, 8), 4, hidden=[0])
    with pytest.raises(ValueError, match="data_shape"):
        ConvEncoder((8, 8), 4)


def test_mlp_decoder_runs_samples_through_its_layers_as_one_matrix():
    """z [S, B, Z] gives the same values and gradients as each [B, Z] alone, for the
    operations of one [S·B, Z] batch (2-D Linear layers: no folding views forward and back)."""
    from torch.profiler import ProfilerActivity, profile

    from vaelab.networks import MLPDecoder

    torch.manual_seed(0)
    dec = MLPDecoder(4, (1, 6, 6), 1, hidden=[8, 8])
    z = torch.randn(3, 5, 4, requires_grad=True)
    out = dec(z)
    assert out.shape == (3, 5, 1, 6, 6)
    each = torch.stack([dec(z[s]) for s in range(3)])
    torch.testing.assert_close(out, each)
    (g_all,) = torch.autograd.grad(out.square().sum(), z)
    (g_each,) = torch.autograd.grad(each.square().sum(), z)
    torch.testing.assert_close(g_all, g_each)

    def operations(latent):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            dec(latent).sum().backward()
        return sum(1 for e in prof.events() if e.name.startswith("aten::"))

    flat = operations(torch.randn(15, 4))
    assert operations(torch.randn(3, 5, 4)) <= flat + 2  # the two reshapes; folding each layer cost 16

