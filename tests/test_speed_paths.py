"""The fast paths of issue 7 compute exactly what the plain paths compute.

Speed itself is measured by benchmarks/throughput.py, not here; these tests pin down that
each means to it (fused optimizer kernels, channels-last convolutions, row-major in-memory
data gathered with index_select, step values sent straight to the loggers) changes nothing
a researcher could see in the numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vaelab.build import build_optimizer, fused_kernels_cover
from vaelab.datamodules import InMemoryImages
from vaelab.networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-2, "weight_decay": 0.0}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(MLPEncoder((1, 8, 8), 6, hidden=[32]), torch.nn.Linear(6, 3))


def _train(optimizer_cfg: dict, steps: int = 20) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = build_optimizer(optimizer_cfg, model.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.rand(16, 1, 8, 8, generator=gen)
        loss = model(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("target", ["torch.optim.Adam", "torch.optim.AdamW"])
def test_fused_auto_takes_the_fused_kernel_on_cpu_and_matches_the_default_update(target):
    cfg = {**ADAM, "_target_": target}
    assert fused_kernels_cover(list(_model().parameters()))  # torch >= 2.4 has CPU kernels
    fused_model, fused_opt = _train({**cfg, "fused": "auto"})
    plain_model, plain_opt = _train({**cfg, "fused": False})
    assert fused_opt.param_groups[0]["fused"] is True
    assert not plain_opt.param_groups[0]["fused"]
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # 20 steps: the same weights


def test_fused_auto_falls_back_where_the_optimizer_has_no_fused_kernel():
    opt = build_optimizer({"_target_": "torch.optim.RMSprop", "lr": 1e-3, "fused": "auto"}, _model().parameters())
    assert isinstance(opt, torch.optim.RMSprop) and not opt.param_groups[0].get("fused")
    # integer tensors have no fused kernel either
    assert not fused_kernels_cover([torch.zeros(3, dtype=torch.long)])


def test_a_bad_fused_value_is_refused_with_the_options():
    with pytest.raises(ValueError, match="auto, true or false"):
        build_optimizer({**ADAM, "fused": "yes"}, _model().parameters())


def test_channels_last_convolutions_compute_the_same_function():
    for shape in [(1, 32, 32), (3, 28, 28)]:
        torch.manual_seed(0)
        fast_enc, fast_dec = ConvEncoder(shape, 8), ConvDecoder(4, shape, 2 * shape[0])
        torch.manual_seed(0)
        ref_enc = ConvEncoder(shape, 8, channels_last=False)
        ref_dec = ConvDecoder(4, shape, 2 * shape[0], channels_last=False)
        conv = fast_enc.features[2].weight  # (the first, with one input channel, is both layouts)
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        x, z = torch.rand(5, *shape), torch.randn(2, 5, 4)
        torch.testing.assert_close(fast_enc(x), ref_enc(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast_dec(z), ref_dec(z), rtol=1e-5, atol=1e-5)
        # the gradients agree too, and checkpoints load across layouts
        fast_enc(x).sum().backward()
        ref_enc(x).sum().backward()
        torch.testing.assert_close(fast_enc.features[0].weight.grad, ref_enc.features[0].weight.grad,
                                   rtol=1e-4, atol=1e-5)
        ref_dec.load_state_dict(fast_dec.state_dict())
        torch.testing.assert_close(fast_dec(z), ref_dec(z), rtol=1e-5, atol=1e-5)


def test_in_memory_images_are_row_major_and_batches_equal_plain_indexing():
    rng = np.random.default_rng(0)
    column_major = np.asfortranarray(rng.integers(0, 256, size=(50, 64), dtype=np.uint8))
    images = torch.from_numpy(column_major).reshape(50, 1, 8, 8)  # as an .npz may hand it over
    assert not images.is_contiguous()
    data = InMemoryImages(images, torch.arange(50))
    assert data.images.is_contiguous()
    idx = [7, 3, 3, 49, 0]
    batch, labels = data.__getitems__(idx)
    torch.testing.assert_close(batch, images[torch.tensor(idx)], rtol=0, atol=0)
    assert labels.tolist() == idx
