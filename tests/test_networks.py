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


# --- plugin contracts, checked when the model is built ------------------------------------------
class FlatDecoder(torch.nn.Module):
    """Maps [N, Z] to [N, C, H, W] but folds K samples of each example into N (a decoder
    written to the 2-d case: the objectives decode [K, N, Z], and validation's IWAE crashed)."""

    def __init__(self, latent_dim, data_shape, out_channels):
        super().__init__()
        self.shape = (out_channels, *data_shape[1:])
        self.net = torch.nn.Linear(latent_dim, out_channels * data_shape[1] * data_shape[2])

    def forward(self, z):
        return self.net(z).view(-1, *self.shape)


def _vae_config(tmp_path, **parts):
    from omegaconf import OmegaConf
    from test_config import compose_train

    from vaelab.jobs import resolve_data_options

    cfg = compose_train(tmp_path, "likelihood=laplace")
    resolve_data_options(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["allowed_targets"] = ["test_networks."]
    config.update({group: {"_target_": f"test_networks.{name}"} for group, name in parts.items()})
    return config


def test_a_plugin_that_breaks_its_contract_is_named_when_the_model_is_built(tmp_path, monkeypatch):
    """Each failed deep inside the first validation or the build (helper 31): a decoder that
    folds z's leading sample dimension into the batch; a likelihood whose distribution is not
    one number an example, or not a distribution; a prior that is not a vaelab Prior."""
    from torch.distributions import Laplace

    from vaelab.build import ModelConfigError, build_vae
    from vaelab.likelihoods import Laplace as VaelabLaplace

    shape = (1, 8, 8)
    build_vae(_vae_config(tmp_path), shape)  # (the config's own parts pass)
    with pytest.raises(ModelConfigError, match=r"the decoder FlatDecoder maps z of shape \(3, 2, latent_dim\) to "
                                                r"\(6, 1, 8, 8\), not \(3, 2, 1, 8, 8\): a decoder keeps z's leading"):
        build_vae(_vae_config(tmp_path, decoder="FlatDecoder"), shape)
    for returned, said in ((lambda loc: Laplace(loc, 1.0), r"gives event shape \(\) and batch shape \(2, 1, 8, 8\)"),
                           (lambda loc: loc, r"gives a Tensor, not a torch.distributions.Distribution")):
        monkeypatch.setattr(VaelabLaplace, "forward", lambda self, params, r=returned: r(params))
        with pytest.raises(ModelConfigError, match=rf"the likelihood Laplace {said} for 2 examples of shape "
                                                   r"\(1, 8, 8\): it must give a distribution whose event shape is "
                                                   r"the data's \(e.g. Independent\(Laplace\(loc, scale\), 3\)\)"):
            build_vae(_vae_config(tmp_path), shape)
    monkeypatch.undo()
    config = _vae_config(tmp_path)
    config["prior"] = {"_target_": "torch.nn.Identity"}
    config["allowed_targets"] = ["torch.nn."]
    with pytest.raises(ModelConfigError, match=r"the prior torch.nn.modules.linear.Identity is not a "
                                               r"vaelab.priors.Prior: subclass it"):
        build_vae(config, shape)
