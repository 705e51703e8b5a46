"""The fast paths of issue 7 compute exactly what the plain paths compute.

Speed itself is measured by benchmarks/throughput.py, not here; these tests pin down that
each means to it (fused optimizer kernels, channels-last convolutions, row-major in-memory
data gathered with index_select, step values sent straight to the loggers) changes nothing
a researcher could see in the numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab.build import build_optimizer, fused_kernels_cover
from vaelab.datamodules import InMemoryImages
from vaelab.networks import ConvDecoder, ConvEncoder, MLPEncoder

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


def test_an_explicit_foreach_keeps_its_kernel_under_fused_auto():
    opt = build_optimizer({**ADAM, "fused": "auto", "foreach": True}, _model().parameters())
    assert opt.param_groups[0]["foreach"] is True and not opt.param_groups[0]["fused"]


def test_gradients_clipped_in_mixed_precision_take_the_unfused_kernel():
    """Lightning clips mixed-precision gradients itself and refuses an optimizer that unscales
    them in its step (the fused kernels): bf16-mixed with trainer.gradient_clip_val stopped at the
    first step with fused=auto (found by helper 18). auto now takes torch's default kernel there;
    true is refused with the fix."""
    opt = build_optimizer({**ADAM, "fused": "auto"}, _model().parameters(), clipped_in_mixed_precision=True)
    assert not opt.param_groups[0]["fused"] and not getattr(opt, "_step_supports_amp_scaling", False)
    with pytest.raises(ValueError, match="fused=true with trainer.gradient_clip_val under mixed precision.*fused=auto"):
        build_optimizer({**ADAM, "fused": True}, _model().parameters(), clipped_in_mixed_precision=True)


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


def test_model_compile_keeps_checkpoint_keys_and_computes_the_same_bound(tmp_path):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from vaelab.jobs import build_datamodule, resolve_data_options
    from vaelab.module import VAEModule

    def module(*overrides: str) -> VAEModule:
        with initialize_config_module(config_module="vaelab.conf", version_base="1.3"):
            cfg = compose("train", overrides=[f"paths.data_dir={tmp_path}/data", f"paths.output_dir={tmp_path}/out",
                                              "logger=none", "latent_dim=4", "encoder.hidden=[32]",
                                              "decoder.hidden=[32]", *overrides])
        resolve_data_options(cfg)
        config = OmegaConf.to_container(cfg, resolve=True)
        torch.manual_seed(0)
        return VAEModule(config=config, data_info=build_datamodule(cfg.data, config).info)

    eager, compiled = module(), module("model.compile=true")
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # no _orig_mod. prefixes
    compiled.load_state_dict(eager.state_dict())  # strict: a checkpoint fits either way
    x = torch.bernoulli(torch.full((16, 1, 8, 8), 0.3))
    torch.manual_seed(1)
    a = eager(x)
    torch.manual_seed(1)
    b = compiled(x)
    torch.testing.assert_close(b.terms["elbo"], a.terms["elbo"], rtol=1e-4, atol=1e-4)
    b.loss.backward()
    assert all(p.grad is not None for p in compiled.vae.encoder.parameters())


def test_model_compile_mode_reaches_torch_compile_and_a_wrong_one_names_the_choices(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from vaelab.jobs import build_datamodule, resolve_data_options
    from vaelab.module import VAEModule

    def config(*overrides: str) -> tuple[dict, dict]:
        with initialize_config_module(config_module="vaelab.conf", version_base="1.3"):
            cfg = compose("train", overrides=[f"paths.data_dir={tmp_path}/data", f"paths.output_dir={tmp_path}/out",
                                              "logger=none", *overrides])
        resolve_data_options(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        return resolved, build_datamodule(cfg.data, resolved).info

    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append((type(self).__name__, kw)))
    VAEModule(*config("model.compile=true", "model.compile_mode=reduce-overhead"))
    assert seen == [("MLPEncoder", {"mode": "reduce-overhead"}), ("MLPDecoder", {"mode": "reduce-overhead"})]
    seen.clear()
    VAEModule(*config())  # compile=false: the mode is checked, nothing is compiled
    assert seen == []
    with pytest.raises(ValueError, match="reduce-overhead"):
        VAEModule(*config("model.compile=true", "model.compile_mode=fastest"))


@pytest.mark.parametrize("val_check_interval", [1.0, 0.5])
def test_throughput_monitor_times_the_training_batches_and_not_the_validation(tmp_path, val_check_interval):
    """One figure an epoch, over its training batches: its validations (at its end, and within
    it with val_check_interval < 1, where the clock went on through the first) left out; the
    file holds each epoch as soon as it ends (a run killed later kept none)."""
    import json
    import time

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from vaelab.callbacks import ThroughputMonitor

    class Slow(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            time.sleep(0.01)
            return (self.w * batch[0].sum()).sum()

        def validation_step(self, batch, batch_idx):
            time.sleep(0.1)  # validation is 4x the training time of an epoch

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    written: list[list[int]] = []

    class Peek(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                written.append([e["epoch"] for e in json.loads((tmp_path / "throughput.json").read_text())["epochs"]])

        def on_validation_end(self, trainer, pl_module):
            time.sleep(0.5)  # (where the checkpoints are saved, after the monitor's hook): not training

    data = DataLoader(TensorDataset(torch.zeros(40, 1)), batch_size=4)  # 10 batches
    monitor = ThroughputMonitor(save_path=str(tmp_path / "throughput.json"))
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[monitor, Peek()],
                         num_sanity_val_steps=0, val_check_interval=val_check_interval)
    trainer.fit(Slow(), data, data)
    assert written == [[0]]
    epochs = json.loads((tmp_path / "throughput.json").read_text())["epochs"]
    assert [(e["epoch"], e["images"]) for e in epochs] == [(0, 40), (1, 40)]
    for e in epochs:
        assert 0.1 <= e["seconds"] < 0.5, e  # 10 steps of 10 ms, not the 1 s (or 2 s) of validation
        assert e["images_per_sec"] == pytest.approx(40 / e["seconds"])


def test_the_epoch_line_shows_the_val_numbers_of_that_epochs_validation_only(capsys):
    """The one line an epoch (output to a file or pipe): with validation every other epoch, an
    epoch without one showed the last validation's val/elbo as its own."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from vaelab.callbacks import ProgressBar

    images = torch.bernoulli(torch.full((32, 1, 8, 8), 0.3))
    data = DataLoader(TensorDataset(images, torch.zeros(32)), batch_size=8)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_model_summary=False,
                         accelerator="cpu", callbacks=[ProgressBar(interactive=False)], check_val_every_n_epoch=2,
                         num_sanity_val_steps=0)
    capsys.readouterr()
    trainer.fit(_tiny_module(), data, data)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert ["val/elbo" in line for line in lines] == [False, True, False], lines
    assert all("train/elbo_epoch" in line for line in lines)


def test_sum_mean_is_the_exact_mean_over_all_examples_and_resets():
    from torchmetrics import MeanMetric

    from vaelab.metrics import SumMean

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=gen) * 50 - 100 for n in (128, 128, 37)]  # a short last batch
    ours, reference = SumMean(), MeanMetric()
    for b in batches:
        ours.update(b.sum(), b.numel())
        reference.update(b)
    torch.testing.assert_close(ours.compute(), torch.cat(batches).mean())
    torch.testing.assert_close(ours.compute(), reference.compute())
    ours.reset()
    ours.update(torch.tensor(6.0), 3)
    assert ours.compute().item() == pytest.approx(2.0)
    ours.update(torch.tensor(0.0), 1)  # an update after compute() is not hidden by its cache
    assert ours.compute().item() == pytest.approx(1.5)
    ours.reset()  # the in-place sums never touched the defaults a reset restores
    assert ours.total.item() == 0.0 and ours.count.item() == 0.0 and ours._update_count == 0
    # under DDP the states are summed across processes: the mean over all their examples
    rank0, rank1 = SumMean(), SumMean()
    rank0.update(torch.tensor(6.0), 3)
    rank1.update(torch.tensor(10.0), 1)
    rank0.merge_state(rank1)
    assert rank0.compute().item() == pytest.approx(16.0 / 4)


def test_pending_sums_keep_their_own_copy_of_a_reused_buffer():
    """A CUDA graph writes every step's sums into the same buffer (model.cuda_graph)."""
    from vaelab.metrics import PendingSumMean, PendingSums

    pending = PendingSums()
    term = PendingSumMean(pending)
    buffer = torch.zeros(1)
    for value in (1.0, 2.0, 3.0):
        buffer.fill_(value)  # the next step's sums, over 4 examples each
        pending.add(buffer, 4)
    torch.testing.assert_close(term.compute(), torch.tensor(6.0 / 12))


def test_pending_sums_fold_into_the_epoch_means_whenever_they_are_read():
    """Training adds each step's term sums to one pending [T] tensor; reading any of the epoch
    means first moves all of it into every term's metric, so the means are exact at any read."""
    from vaelab.metrics import PendingSumMean, PendingSums

    pending = PendingSums()
    elbo, kl = PendingSumMean(pending), PendingSumMean(pending)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 2, generator=gen) * 30 - 90 for n in (128, 128, 37)]  # [B, T]: two terms
    for b in batches[:2]:
        pending.add(b.sum(0), b.shape[0])
    assert elbo.total.item() == 0.0 and kl.total.item() == 0.0  # one pending addition a step, nothing else
    torch.testing.assert_close(kl.compute(), torch.cat(batches[:2])[:, 1].mean())  # reading one folds all
    assert pending.sums is None and pending.count == 0 and elbo._update_count == 1
    torch.testing.assert_close(elbo.compute(), torch.cat(batches[:2])[:, 0].mean())
    pending.add(batches[2].sum(0), 37)  # a step after a read is not hidden by compute()'s cache
    torch.testing.assert_close(elbo.compute(), torch.cat(batches)[:, 0].mean())
    torch.testing.assert_close(kl.compute(), torch.cat(batches)[:, 1].mean())
    elbo.reset(), kl.reset()  # Lightning resets them after each epoch's read
    pending.add(torch.tensor([6.0, -3.0]), 3)
    assert elbo.compute().item() == pytest.approx(2.0) and kl.compute().item() == pytest.approx(-1.0)


def test_pending_sums_give_each_logging_interval_exactly_across_epoch_reads():
    """interval() returns what was added since its previous call; the epoch's read (a flush)
    in the middle of an interval neither loses nor repeats any step of it."""
    from vaelab.metrics import PendingSumMean, PendingSums

    pending = PendingSums()
    term = PendingSumMean(pending)
    assert pending.interval() == (None, 0)
    steps = [(torch.tensor([float(v)]), n) for v, n in ((1, 2), (2, 4), (3, 1), (4, 2), (5, 3), (6, 1))]

    def added(a, b):
        return sum(s.item() for s, _ in steps[a:b]), sum(n for _, n in steps[a:b])

    for s, n in steps[:2]:
        pending.add(s, n)
    sums, count = pending.interval()  # steps 0-1
    assert (sums.item(), count) == added(0, 2)
    sums.add_(100.0)  # the caller's tensor is its own
    pending.add(*steps[2])
    term.compute()  # an epoch's end: the pending sums move into the metric (a flush)
    term.reset()
    pending.add(*steps[3])
    sums, count = pending.interval()  # steps 2-3, across the flush
    assert (sums.item(), count) == added(2, 4)
    pending.add(*steps[4])
    term.compute()
    sums, count = pending.interval()  # step 4, read after the flush with nothing added since
    assert (sums.item(), count) == added(4, 5)
    assert pending.interval() == (None, 0)
    pending.add(*steps[5])
    assert tuple(x.item() if torch.is_tensor(x) else x for x in pending.interval()) == added(5, 6)
    assert term.compute().item() == pytest.approx(sum(s.item() for s, _ in steps[3:]) / 6)  # epoch 2: steps 3-5


def test_nan_guard_reads_the_term_sums_and_still_names_the_bad_term():
    from types import SimpleNamespace

    from vaelab.guards import NaNGuard, NonFiniteLossError

    terms = {"elbo": torch.tensor([1.0, float("nan")]), "recon": torch.tensor([0.5, 0.5]), "kl": torch.tensor([1.0, 1.0])}
    out = SimpleNamespace(loss=torch.tensor(2.0), terms=terms)
    module = SimpleNamespace(global_step=7, current_epoch=0, _trainer=None)
    sums = torch.stack(list(terms.values())).sum(-1)
    with pytest.raises(NonFiniteLossError, match=r"train/elbo is NaN for 1 of 2 examples"):
        NaNGuard("stop").bad_step(module, torch.zeros(2, 1, 2, 2), out, sums)
    good = {k: torch.ones(2) for k in terms}
    # a data batch's values are counted by example: 2 of 3 examples, not 3 of 12 pixels (helper 30)
    x = torch.zeros(3, 1, 2, 2)
    x[0, 0, 0, 0] = x[2, 0, 1, 1] = x[2, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"the data batch x is NaN for 2 of 3 examples \(3 values\)"):
        NaNGuard("stop").bad_step(module, x, SimpleNamespace(loss=torch.tensor(float("nan")), terms=good),
                                  torch.stack(list(good.values())).sum(-1))
    ok = SimpleNamespace(loss=torch.tensor(2.0), terms=good)
    assert not NaNGuard("stop").bad_step(module, torch.zeros(2, 1, 2, 2), ok, torch.stack(list(good.values())).sum(-1))
    # an infinite loss with finite terms (a β-weighted or free-bits loss) is caught too
    inf_loss = SimpleNamespace(loss=torch.tensor(float("inf")), terms=good)
    with pytest.raises(NonFiniteLossError, match="train/loss"):
        NaNGuard("stop").bad_step(module, torch.zeros(2, 1, 2, 2), inf_loss, torch.stack(list(good.values())).sum(-1))
    # sums that hold the loss's own entry (VAEModule's: the loss times the batch size, last)
    # need no second reading of the loss: an infinite loss is caught through that entry, and
    # with finite sums the loss itself is not read again (the last call)
    with_loss = torch.cat([torch.stack(list(good.values())).sum(-1), torch.tensor([float("inf")])])
    with pytest.raises(NonFiniteLossError, match="train/loss"):
        NaNGuard("stop").bad_step(module, torch.zeros(2, 1, 2, 2), inf_loss, with_loss, sums_include_loss=True)
    finite_with_loss = torch.cat([torch.stack(list(good.values())).sum(-1), torch.tensor([4.0])])
    assert not NaNGuard("stop").bad_step(module, torch.zeros(2, 1, 2, 2), ok, finite_with_loss, sums_include_loss=True)
    assert not NaNGuard("stop").bad_step(module, torch.zeros(2, 1, 2, 2), inf_loss, finite_with_loss,
                                         sums_include_loss=True)  # the loss is read only through the sums


def test_nvml_probe_is_skipped_only_where_nvml_cannot_load(monkeypatch):
    import ctypes

    from vaelab.build import skip_failing_nvml_probe

    if not torch.backends.cuda.is_built():
        pytest.skip("a torch without CUDA never probes NVML")
    before = torch.cuda.is_available()

    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # NVML present: leave torch's choice
    assert not skip_failing_nvml_probe()
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert skip_failing_nvml_probe()
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "0"
    assert torch.cuda.is_available() == before  # the same answer, without the failed load
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK")
    assert not skip_failing_nvml_probe()  # not set: nothing to do


@pytest.mark.parametrize("sample_shape", [(), (3,)])
def test_bernoulli_image_log_prob_is_torchs_with_the_same_gradients(sample_shape):
    """The Bernoulli likelihood negates after summing over the pixels (two full-size passes
    fewer per step) and, on the CPU, takes log(1 + e) where torch takes log1p(e) (which this
    torch does not vectorize): values equal torch's Independent(Bernoulli) to float32 rounding,
    gradients exactly."""
    from torch.distributions import Bernoulli, Independent

    from vaelab.likelihoods import Bernoulli as BernoulliLikelihood

    gen = torch.Generator().manual_seed(0)
    params = torch.randn(*sample_shape, 4, 1, 6, 5, generator=gen, requires_grad=True)
    x = torch.bernoulli(torch.full((4, 1, 6, 5), 0.3), generator=gen)
    px = BernoulliLikelihood()(params)
    reference = Independent(Bernoulli(logits=params, validate_args=False), 3)
    assert isinstance(px, Independent) and px.batch_shape == reference.batch_shape
    assert px.event_shape == reference.event_shape == (1, 6, 5)
    ours, theirs = px.log_prob(x), reference.log_prob(x)
    assert ours.shape == (*sample_shape, 4)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours.sum(), params)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), params)
    assert torch.equal(g_ours, g_theirs)
    torch.testing.assert_close(px.mean, reference.mean)
    assert px.sample().shape == reference.sample().shape


@pytest.mark.parametrize("family", ["gaussian", "laplace"])
@pytest.mark.parametrize("sigma", [1.0, 0.3, "learned"])
@pytest.mark.parametrize("sample_shape", [(), (3,)])
def test_shared_scale_log_prob_is_torchs_with_the_same_gradients(family, sigma, sample_shape):
    """A Gaussian (Laplace) with one σ (b) for all pixels puts it after the sum over the pixels
    (no full-size σ, σ², log σ or division): values equal torch's Independent(Normal/Laplace)
    with that scale to float32 rounding, and so do the gradients for μ and for a learned scale;
    sampling, the mean, entropy and expand are torch's."""
    from torch.distributions import Independent, Laplace, Normal

    from vaelab.likelihoods import Gaussian
    from vaelab.likelihoods import Laplace as LaplaceLikelihood

    gen = torch.Generator().manual_seed(1)
    if family == "gaussian":
        likelihood, base = Gaussian(sigma=sigma, init_sigma=0.2), Normal
    else:
        likelihood, base = LaplaceLikelihood(scale=sigma, init_scale=0.2), Laplace
    params = torch.randn(*sample_shape, 4, 1, 6, 5, generator=gen, requires_grad=True)
    x = torch.rand(4, 1, 6, 5, generator=gen)
    px = likelihood(params)
    assert isinstance(px, likelihood._shared_image)  # the fewer-passes log_prob, not torch's
    scale = likelihood._bounded(likelihood._raw_scale()) if sigma == "learned" else torch.tensor(sigma)
    reference = Independent(base(params, scale.expand_as(params)), 3)
    assert px.batch_shape == reference.batch_shape and px.event_shape == reference.event_shape
    ours, theirs = px.log_prob(x), reference.log_prob(x)
    assert ours.shape == (*sample_shape, 4)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-4)
    inputs = [params, *likelihood.parameters()]
    assert len(inputs) == (2 if sigma == "learned" else 1)
    for g_ours, g_theirs in zip(torch.autograd.grad(ours.sum(), inputs), torch.autograd.grad(theirs.sum(), inputs),
                                strict=True):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(px.mean, reference.mean)
    torch.testing.assert_close(px.entropy(), reference.entropy())
    assert px.rsample().shape == reference.sample().shape
    wider = px.expand(torch.Size([2, *px.batch_shape]))
    torch.testing.assert_close(wider.log_prob(x), theirs.expand(2, *theirs.shape), rtol=1e-6, atol=1e-4)


# --- issue 7, third session: the per-step work of Lightning's loop and the ELBO ------------------
def test_no_profiler_is_the_default_and_a_configured_profiler_is_kept():
    from lightning.pytorch.profilers import SimpleProfiler
    from omegaconf import OmegaConf

    from vaelab.profiling import NoProfiler, default_profiler

    assert isinstance(default_profiler(OmegaConf.create({"max_epochs": 1}))["profiler"], NoProfiler)
    assert default_profiler(OmegaConf.create({"profiler": "simple"})) == {}
    # Lightning takes it as its profiler; profile() nests and returns the same cheap context
    import lightning.pytorch as pl

    trainer = pl.Trainer(profiler=NoProfiler(), logger=False, enable_checkpointing=False, accelerator="cpu")
    with trainer.profiler.profile("a"), trainer.profiler.profile("b"):
        pass
    assert trainer.profiler.profile("a") is trainer.profiler.profile("b")
    assert trainer.profiler.summary() == ""
    # and a real profiler asked for in the config still profiles
    assert isinstance(pl.Trainer(profiler="simple", logger=False, accelerator="cpu").profiler, SimpleProfiler)


def test_the_hook_name_fast_path_keeps_lightnings_bookkeeping(tmp_path):
    """VAEModule stores Lightning's ``_current_fx_name`` past nn.Module.__setattr__: every hook
    still sees its own name (self.log depends on it), and other attributes still register."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    seen: dict[str, str | None] = {}
    template = _tiny_module()

    class Recording(type(template)):
        def training_step(self, batch, batch_idx):
            seen["training_step"] = self._current_fx_name
            return super().training_step(batch, batch_idx)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            seen["on_train_batch_end"] = self._current_fx_name

    module = Recording(template.config, template.data_info)
    images = torch.bernoulli(torch.full((32, 1, 8, 8), 0.3))
    loader = DataLoader(TensorDataset(images, torch.zeros(32)), batch_size=16)
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path).fit(module, loader)
    assert seen == {"training_step": "training_step", "on_train_batch_end": "on_train_batch_end"}
    assert module._current_fx_name is None  # restored after the last hook
    assert "_current_fx_name" not in {**module._parameters, **module._buffers, **module._modules}
    module.extra = torch.nn.Linear(2, 2)  # everything else still goes through nn.Module
    assert "extra" in module._modules and any(n.startswith("extra.") for n, _ in module.named_parameters())


def test_empty_batch_hooks_of_callbacks_are_skipped_and_overridden_ones_still_run(tmp_path):
    """Hooks a callback inherits from ``Callback`` unchanged become None, so Lightning's loop
    skips them; the hooks a class overrides (a user's, ModelCheckpoint's) still run each step."""
    import collections

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from vaelab.profiling import BATCH_HOOKS, skip_empty_batch_hooks

    calls: collections.Counter[str] = collections.Counter()

    class Counting(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            calls["on_train_batch_end"] += 1

        def on_before_backward(self, trainer, pl_module, loss):
            calls["on_before_backward"] += 1

    counting, bare = Counting(), pl.Callback()
    saving = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    skipped = skip_empty_batch_hooks([counting, bare, saving])
    assert skipped["Callback"] == list(BATCH_HOOKS)
    assert set(skipped["Counting"]) == set(BATCH_HOOKS) - {"on_train_batch_end", "on_before_backward"}
    assert "on_train_batch_end" not in skipped["ModelCheckpoint"]  # where it saves every n steps
    assert counting.on_after_backward is None and bare.on_train_batch_start is None
    assert skip_empty_batch_hooks([counting, bare, saving]) == {}  # nothing more the second time
    assert Counting.on_after_backward is pl.Callback.on_after_backward  # the classes are untouched

    images = torch.bernoulli(torch.full((64, 1, 8, 8), 0.3))
    loader = DataLoader(TensorDataset(images, torch.zeros(64)), batch_size=16)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp_path, callbacks=[counting, bare, saving])
    trainer.fit(_tiny_module(), loader)
    assert calls == {"on_train_batch_end": 4, "on_before_backward": 4}
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]


def test_checkpoint_and_progress_hooks_with_nothing_to_do_are_skipped_and_the_rest_still_save(tmp_path):
    """The best-val/elbo checkpoint (no step or time trigger) and a progress bar with no bar
    (a log file) have nothing to do after a training batch: their hook becomes None. A
    checkpoint with a time trigger keeps it; LatestCheckpoint keeps it and still saves every
    N steps (its own test first skips the steps it cannot save at)."""
    from datetime import timedelta

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from vaelab.callbacks import ProgressBar
    from vaelab.profiling import skip_empty_batch_hooks
    from vaelab.runs import LatestCheckpoint

    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val/elbo", mode="max")
    timed = ModelCheckpoint(dirpath=tmp_path / "timed", train_time_interval=timedelta(hours=1))
    latest = LatestCheckpoint(dirpath=str(tmp_path / "latest"), every_n_train_steps=3)
    quiet, live = ProgressBar(interactive=False), ProgressBar(interactive=True)
    skipped = skip_empty_batch_hooks([best, timed, latest, quiet, live])
    assert best.on_train_batch_end is None and "on_train_batch_end" in skipped["ModelCheckpoint"]
    assert callable(timed.on_train_batch_end) and callable(latest.on_train_batch_end)
    assert quiet.on_train_batch_end is None and callable(live.on_train_batch_end)

    seen: dict[int, list[str]] = {}

    class Files(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[trainer.global_step] = sorted(p.name for p in (tmp_path / "latest").glob("*.ckpt"))

    images = torch.bernoulli(torch.full((64, 1, 8, 8), 0.3))
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=True, accelerator="cpu", default_root_dir=tmp_path,
                         callbacks=[latest, Files()])
    trainer.fit(_tiny_module(), DataLoader(TensorDataset(images, torch.zeros(64)), batch_size=8))
    # (Lightning runs checkpoint callbacks last: Files sees a step's save at the next step)
    assert seen[3] == [] and seen[4] == seen[6] == ["latest-step3.ckpt"] and seen[7] == ["latest-step6.ckpt"]


def test_the_step_checkpoint_saves_by_the_clock_and_under_ddp_by_rank_zeros_clock(tmp_path, monkeypatch):
    """LatestCheckpoint's default trigger is time: a save once every_n_minutes have passed since
    the last one (the clock restarting at each save, an epoch's end included), with
    every_n_train_steps as a second trigger. Under DDP rank 0 reads the clock every
    check_every_n_steps steps and its verdict is what every rank acts on."""
    import types

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    import vaelab.runs as runs
    from vaelab.runs import LatestCheckpoint

    now = [0.0]  # a clock that moves 60 s with each training step, read by LatestCheckpoint only
    fake_time = types.SimpleNamespace(**{**vars(runs.time), "monotonic": lambda: now[0]})
    monkeypatch.setattr(runs, "time", fake_time)
    seen: dict[int, list[str]] = {}

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            now[0] = 60.0 * trainer.global_step
            seen[trainer.global_step] = sorted(p.name for p in (tmp_path / "latest").glob("*.ckpt"))

    def fit(**trigger):
        now[0] = 0.0
        seen.clear()
        for old in (tmp_path / "latest").glob("*.ckpt"):
            old.unlink()
        latest = LatestCheckpoint(dirpath=str(tmp_path / "latest"), **trigger)
        images = torch.bernoulli(torch.full((80, 1, 8, 8), 0.3))
        trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu", default_root_dir=tmp_path, callbacks=[latest, Clock()])
        trainer.fit(_tiny_module(), DataLoader(TensorDataset(images, torch.zeros(80)), batch_size=8))
        # (Lightning runs checkpoint callbacks last: Clock sees a step's save at the next step)
        return [next((s - 1 for s in sorted(seen) if name in seen[s]), None) for name in
                sorted({n for names in seen.values() for n in names}, key=lambda n: int(n[11:-5]))]

    # every 2.5 minutes = 150 s: due after step 3 (180 s), then 150 s after that save: step 6
    assert fit(every_n_minutes=2.5) == [3, 6, 9]
    # and every 2 steps: whichever comes first; each save restarts the clock, so here the steps win
    assert fit(every_n_minutes=2.5, every_n_train_steps=2) == [2, 4, 6, 8]
    # every 4 steps: the clock fires at 3 (180 s), the steps at 4, the clock at 7 (4's save at 240 s + 150)
    assert fit(every_n_minutes=2.5, every_n_train_steps=4) == [3, 4, 7, 8]
    # neither: the epoch's end only (after step 10, when no later step can see it)
    assert fit(every_n_minutes=None) == [] and sorted(p.name for p in (tmp_path / "latest").glob("*.ckpt")) == [
        "latest-step10.ckpt"]

    # DDP: only at steps divisible by check_every_n_steps, and by the broadcast verdict
    latest = LatestCheckpoint(dirpath=str(tmp_path / "ddp"), every_n_minutes=5, check_every_n_steps=4)
    asked, saved = [], []
    verdict = {8: True}  # rank 0's clock says "due" at step 8; this rank's says never (now = 0)

    def broadcast(obj, src=0):
        asked.append((step, obj))
        return verdict.get(step, False)

    latest._should_skip_saving_checkpoint = lambda trainer: False
    latest._save_topk_checkpoint = lambda trainer, candidates: saved.append(trainer.global_step)
    latest._monitor_candidates = lambda trainer: {}
    validation_after: set[int] = set()
    latest._validation_follows = lambda trainer: trainer.global_step in validation_after
    now[0] = 0.0
    for step in range(1, 13):
        # (a SIGTERM at step 10 saves nothing under DDP: the ranks may learn of it at different steps)
        trainer = types.SimpleNamespace(global_step=step, world_size=2, received_sigterm=step == 10,
                                        strategy=types.SimpleNamespace(broadcast=broadcast))
        latest.on_train_batch_end(trainer, None, None, None, step)
    assert asked == [(4, False), (8, False), (12, False)] and saved == [8]
    # a save at a step after which a validation runs (val_check_interval) is made again after it:
    # at the next step, on every rank alike (they share the verdict), with no broadcast of its own;
    # with a validation after every step, not at every step (22 and 23: the save at 20 stands)
    asked.clear(), saved.clear()
    validation_after.update({20, 22, 23})
    verdict = {20: True}
    for step in range(13, 25):
        trainer = types.SimpleNamespace(global_step=step, world_size=2, received_sigterm=False,
                                        strategy=types.SimpleNamespace(broadcast=broadcast))
        latest.on_train_batch_end(trainer, None, None, None, step)
    assert asked == [(16, False), (20, False), (24, False)] and saved == [20, 21]
    saved.clear()
    verdict = {24: True}
    for step in range(21, 29):
        trainer = types.SimpleNamespace(global_step=step, world_size=2, received_sigterm=False,
                                        strategy=types.SimpleNamespace(broadcast=broadcast))
        validation_after.add(step)
        latest.on_train_batch_end(trainer, None, None, None, step)
    assert saved == [24]

    # the callback's state in a checkpoint of a run from before the time trigger (every 500 steps) is found
    assert LatestCheckpoint(dirpath=str(tmp_path), every_n_train_steps=500).state_key == (
        "LatestCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 500, 'every_n_epochs': 0, "
        "'train_time_interval': None}")

    for bad, fix in [(dict(every_n_minutes=0), "every_n_minutes=0: give a number of minutes > 0, or null"),
                     (dict(every_n_train_steps=-1), "every_n_train_steps=-1: give a number of steps >= 1"),
                     (dict(check_every_n_steps=0), "check_every_n_steps=0: give a number of steps >= 1")]:
        with pytest.raises(ValueError, match=f"callbacks.step_checkpoint.{fix}"):
            LatestCheckpoint(dirpath=str(tmp_path), **bad)


def _fit_with_checkpoints(folder, best_cls, save_last, epochs=3, ckpt_path=None, mode="max"):
    """The tiny module on 80 binary 8×8 images for ``epochs`` epochs (10 steps each), with
    train.py's best and latest-state checkpoints in ``folder``; returns the checkpoint plugin,
    which records what it was asked to serialize and to link."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from vaelab.checkpoint_io import AtomicCheckpointIO
    from vaelab.runs import LatestCheckpoint

    class Recording(AtomicCheckpointIO):
        def __init__(self):
            super().__init__()
            self.serialized, self.linked = [], []

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            self.serialized.append((checkpoint["global_step"], Path(path).name))
            super().save_checkpoint(checkpoint, path, storage_options)

        def link_checkpoint(self, source, path):
            self.linked.append((Path(source).name, Path(path).name))
            super().link_checkpoint(source, path)

    pl.seed_everything(0, verbose=False)
    images = torch.bernoulli(torch.full((80, 1, 8, 8), 0.3), generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(images, torch.zeros(80)), batch_size=8)
    best = best_cls(dirpath=str(folder), filename="best-epoch{epoch:03d}-step{step}", auto_insert_metric_name=False,
                    monitor="val/elbo", mode=mode, save_top_k=1, save_last=save_last)
    latest = LatestCheckpoint(dirpath=str(folder), every_n_minutes=None)
    io = Recording()
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=folder, callbacks=[best, latest], plugins=[io],
                         num_sanity_val_steps=0)
    trainer.fit(_tiny_module(), data, data, ckpt_path=ckpt_path)
    io.wait()
    return io


def _same(a, b) -> bool:
    """Whether two checkpoint values are equal, tensors by value."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@pytest.mark.parametrize("mode", ["max", "min"])  # min: the ELBO rises, so later epochs save no best one
def test_an_epoch_ends_state_is_serialized_once_and_linked_under_its_other_names(tmp_path, mode):
    """train.py's checkpoints at an epoch's end: the best one (when val/elbo improved),
    last.ckpt and latest-step<N>.ckpt hold the same training state. It is serialized and
    written once (the best checkpoint, else last.ckpt); the other names are hard links to that
    file. The state they hold is the one their own saves would have written: Lightning's
    ModelCheckpoint with save_last=true (three serializations, the same seed) gives the same
    weights, optimizer state, loops and step, in files that differ only in the two callbacks'
    records of their file names; but Lightning 2.6's last.ckpt stays at the last best state,
    where vaelab's follows the training (it holds the latest state's step)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vaelab.runs import BestCheckpoint

    ours, theirs = tmp_path / "linked", tmp_path / "written"
    io = _fit_with_checkpoints(ours, BestCheckpoint, "link", mode=mode)
    reference = _fit_with_checkpoints(theirs, ModelCheckpoint, True, mode=mode)

    steps = (10, 20, 30)
    improved = {step for step, name in reference.serialized if name.startswith("best-")}
    assert improved == ({10, 20, 30} if mode == "max" else {10})  # (what this seed's ELBO does)
    # one serialization a step: the best checkpoint where val/elbo improved, else last.ckpt
    assert [step for step, _ in io.serialized] == list(steps)
    for step, name in io.serialized:
        assert name.startswith("best-") if step in improved else name == "last.ckpt", (step, name)
    # Lightning's own: three where it improved (best, last, latest), one elsewhere
    assert len(reference.serialized) == sum(3 if s in improved else 1 for s in steps)
    for step, name in io.serialized:
        if step in improved:
            assert (name, "last.ckpt") in io.linked and (name, f"latest-step{step}.ckpt") in io.linked
        else:
            assert ("last.ckpt", f"latest-step{step}.ckpt") in io.linked

    files = {p.name: p for p in ours.glob("*.ckpt")}
    assert sorted(files) == sorted(p.name for p in theirs.glob("*.ckpt"))
    best = next(p for n, p in files.items() if n.startswith("best-"))
    assert os.path.samefile(best, files["last.ckpt"]) == (30 in improved)
    assert os.path.samefile(best, files["latest-step30.ckpt"]) == (30 in improved)
    assert os.path.samefile(files["last.ckpt"], files["latest-step30.ckpt"])

    for name in files:
        mine = torch.load(ours / name, weights_only=True)
        # (Lightning 2.6's last.ckpt is its last best state: the state at the last step is its latest-step file)
        written = torch.load(theirs / ("latest-step30.ckpt" if name == "last.ckpt" else name), weights_only=True)
        for key in ("state_dict", "optimizer_states", "loops", "global_step", "epoch", "lr_schedulers"):
            assert _same(mine[key], written[key]), (name, key)
        assert mine["callbacks"].keys() == written["callbacks"].keys()  # BestCheckpoint keeps ModelCheckpoint's key
        for key, state in mine["callbacks"].items():
            paths = ("best_model_path", "last_model_path", "kth_best_model_path", "best_k_models", "dirpath")
            assert _same({k: v for k, v in state.items() if k not in paths},
                         {k: v for k, v in written["callbacks"][key].items() if k not in paths}), (name, key)


def test_training_resumes_from_a_linked_latest_state_and_from_modelcheckpoints_record(tmp_path):
    """The linked latest-state file is a checkpoint like any other: training continues from it
    at its step; and a checkpoint written by Lightning's ModelCheckpoint (runs from before
    BestCheckpoint) gives BestCheckpoint its record of the best score."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from vaelab.runs import BestCheckpoint

    folder = tmp_path / "run"
    _fit_with_checkpoints(folder, BestCheckpoint, "link", epochs=2)
    latest = folder / "latest-step20.ckpt"
    io = _fit_with_checkpoints(folder, BestCheckpoint, "link", epochs=3, ckpt_path=str(latest))
    assert [step for step, _ in io.serialized] == [30]
    assert torch.load(folder / "latest-step30.ckpt", weights_only=True)["global_step"] == 30

    old = tmp_path / "old"
    _fit_with_checkpoints(old, ModelCheckpoint, True, epochs=1)
    record = torch.load(old / "last.ckpt", weights_only=True)["callbacks"]
    key = next(k for k in record if k.startswith("ModelCheckpoint"))
    best = BestCheckpoint(dirpath=str(old), monitor="val/elbo", mode="max", save_top_k=1, save_last="link",
                          filename="best-epoch{epoch:03d}-step{step}", auto_insert_metric_name=False)
    assert best.state_key == key
    best.load_state_dict(record[key])
    assert best.best_model_score is not None and torch.equal(best.best_model_score, record[key]["best_model_score"])


def test_the_step_checkpoint_waits_for_the_optimizer_step_of_an_accumulation(tmp_path, monkeypatch):
    """With trainer.accumulate_grad_batches=3 and the clock due in the middle of an
    accumulation (4 minutes, 1 minute a batch: due at batch 4 of 12), the save waits for the
    batch whose optimizer step takes the gathered gradients (batch 6): a checkpoint holds no
    gradients, so a save between would lose those batches' share of the next step on resume."""
    import types

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    import vaelab.runs as runs
    from vaelab.runs import LatestCheckpoint

    now = [0.0]
    monkeypatch.setattr(runs, "time", types.SimpleNamespace(**{**vars(runs.time), "monotonic": lambda: now[0]}))
    saved_after = []  # batches of the epoch trained at each save

    class Recording(LatestCheckpoint):
        def _save_checkpoint(self, trainer, filepath):
            saved_after.append((trainer.fit_loop.epoch_loop.batch_progress.current.processed, trainer.global_step))
            super()._save_checkpoint(trainer, filepath)

    class Clock(pl.Callback):  # a minute a batch, before the checkpoint callbacks (Lightning runs those last)
        def on_train_batch_end(self, *args):
            now[0] += 60.0

    images = torch.bernoulli(torch.full((96, 1, 8, 8), 0.3))
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp_path, accumulate_grad_batches=3,
                         callbacks=[Recording(dirpath=str(tmp_path / "latest"), every_n_minutes=4), Clock()])
    trainer.fit(_tiny_module(), DataLoader(TensorDataset(images, torch.zeros(96)), batch_size=8))
    # due from batch 4 (240 s); saved at batch 6 (step 2), then due again at 10 (240 s later), saved at 12
    # (step 4, the epoch's last batch: at the epoch's end, after the batch's hooks)
    assert saved_after == [(6, 2), (12, 4)]


@pytest.mark.parametrize("stop_at", [None, 10, 5])
def test_a_step_checkpoint_before_a_validation_is_saved_again_after_it(tmp_path, stop_at):
    """A save at a batch after which a validation runs (val_check_interval, or the epoch's last
    batch) is made again after that validation: a checkpoint from before it makes Lightning's
    resume skip that validation, so the resumed run's random draws, and so its weights, left
    the uninterrupted run's (from such a file at an epoch's end, val/elbo one epoch on was 0.14
    nats off). The first save keeps the training where the process stops before the second: a
    SIGTERM at such a step (the epoch's last, 10, or a mid-epoch validation's, 5) with a
    validation of several batches, which Lightning cuts short at its first, still saves that
    step (a save put off until after the validation was lost)."""
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from torch.utils.data import DataLoader, TensorDataset

    from vaelab.runs import LatestCheckpoint

    saves, validations = [], [0]

    class Recording(LatestCheckpoint):
        def _save_checkpoint(self, trainer, filepath):
            saves.append((trainer.global_step, validations[0]))
            super()._save_checkpoint(trainer, filepath)

    class Count(pl.Callback):
        def on_validation_end(self, *args):
            validations[0] += 1

        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step + 1 == stop_at:  # (what Lightning's SIGTERM handler sets)
                trainer._signal_connector.received_sigterm = True

    images = torch.bernoulli(torch.full((80, 1, 8, 8), 0.3))
    data = DataLoader(TensorDataset(images, torch.zeros(80)), batch_size=8)  # 10 batches an epoch
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp_path,
                         val_check_interval=0.5, limit_val_batches=3, num_sanity_val_steps=0,
                         callbacks=[Count(), Recording(dirpath=str(tmp_path / "latest"), every_n_minutes=None,
                                                       every_n_train_steps=None if stop_at else 5)])
    if stop_at is None:
        trainer.fit(_tiny_module(), data, data)
        # due at 5, 10, 15, 20, each followed by a validation: saved, and saved again after it, at
        # the next step mid-epoch (6, 16) and at the epoch's end (10, 20)
        assert saves == [(5, 0), (6, 1), (10, 1), (10, 2), (15, 2), (16, 3), (20, 3), (20, 4)]
    else:
        with pytest.raises(SIGTERMException):
            trainer.fit(_tiny_module(), data, data)
        assert saves == [(stop_at, stop_at // 5 - 1)] and validations == [stop_at // 5 - 1]
        assert [p.name for p in (tmp_path / "latest").iterdir()] == [f"latest-step{stop_at}.ckpt"]
        # what the stop's message says: a state before the validation, which a resume skips
        latest = next(cb for cb in trainer.callbacks if isinstance(cb, LatestCheckpoint))
        assert latest.saved_before_validation and latest.saved_at(stop_at).endswith(f"latest-step{stop_at}.ckpt")


def test_the_count_of_skipped_steps_is_kept_in_the_checkpoint():
    """nan_policy=skip stops after max_skipped_steps skips: a resumed run counts the skips
    before its checkpoint too (a checkpoint from before this counts from 0)."""
    module = _tiny_module()
    module.nan_guard.skipped = 7
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    resumed = _tiny_module()
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.nan_guard.skipped == 7
    resumed.on_load_checkpoint({})
    assert resumed.nan_guard.skipped == 0


def _tiny_module():
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from vaelab.module import VAEModule

    with initialize_config_module(config_module="vaelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", "latent_dim=2", "encoder.hidden=[8]", "decoder.hidden=[8]",
                                          "data.binarize=dynamic", "paths.data_dir=.", "paths.output_dir=."])
    config = OmegaConf.to_container(cfg, resolve=True)
    info = {"name": "digits", "shape": (1, 8, 8), "num_levels": 17, "binary": True, "binarize": "dynamic",
            "dequantize": False, "bin_width": 1.0}
    return VAEModule(config=config, data_info=info)


@pytest.mark.parametrize("beta", [1.0, 0.5])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_elbo_shortcuts_give_the_same_numbers_and_gradients(beta, num_samples):
    """recon for S = 1 is the one sample's log p(x|z) (no mean over a length-1 axis), and for
    β = 1 the loss is kl − recon: the same floating-point numbers as the formula written out."""
    from vaelab.objectives import ELBO

    module = _tiny_module()
    vae = module.vae
    x = torch.bernoulli(torch.full((16, 1, 8, 8), 0.3))
    torch.manual_seed(3)
    out = ELBO(num_samples=num_samples, beta=beta)(vae, x)
    out.loss.backward()
    grads = [p.grad.clone() for p in vae.parameters()]
    vae.zero_grad()
    # the same draw, the bound written out as DESIGN.md states it
    torch.manual_seed(3)
    q = vae.encode(x)
    z = q.rsample((num_samples,))
    recon = vae.decode(z).log_prob(x).mean(0)
    kl = torch.distributions.kl_divergence(q, vae.prior_distribution())
    loss = -(recon - beta * kl).mean()
    loss.backward()
    assert torch.equal(out.terms["recon"], recon) and torch.equal(out.terms["kl"], kl)
    assert torch.equal(out.terms["elbo"], recon - kl)
    assert torch.equal(out.loss, loss)
    for a, p in zip(grads, vae.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=1e-7)


_CHURN = """
import resource, sys, torch
from vaelab.build import keep_freed_memory
print(keep_freed_memory(sys.argv[1]))
count, mib = int(sys.argv[2]), int(sys.argv[3])
def step():  # what a training step does to the allocator: large tensors made, written, freed
    xs = [torch.ones(mib << 18) for _ in range(count)]  # count x mib MiB
    del xs
# the heap settles into its layout: the second step of 2 x 64 MiB faults in one block, and in
# about one process in seven the third does (3 of 20 such runs failed when only two steps settled)
step(); step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.parametrize("count, mib", [(20, 2), (2, 64)], ids=["20x2MiB", "2x64MiB"])
def test_keep_freed_memory_makes_a_step_reuse_the_memory_the_last_step_freed(count, mib):
    """malloc=tuned: glibc keeps freed memory for the next step, so a step's large tensors no
    longer fault their pages in afresh (10,240 pages a step with 20 x 2 MiB; 32,768 with 2 x
    64 MiB, blocks above glibc's largest mmap threshold, as an importance-sampled evaluation
    pass makes them); malloc=system changes nothing."""
    import subprocess
    import sys

    from vaelab.build import keep_freed_memory

    with pytest.raises(ValueError, match=r"malloc='fast' is not an option: choose one of \('tuned', 'system'\)"):
        keep_freed_memory("fast")
    assert keep_freed_memory("system") is False
    proc = subprocess.run([sys.executable, "-c", _CHURN, "tuned", str(count), str(mib)], capture_output=True,
                          text=True, check=True)
    applied, faults = proc.stdout.split()
    if applied != "True":
        pytest.skip("not glibc on Linux: the C library's own defaults apply")
    assert float(faults) < count * mib * 256 / 10, faults  # under a tenth of the pages each step writes


@pytest.mark.parametrize("shape", [(64, 1, 8, 8), (5, 3, 7, 9), (2, 1, 32, 32)])
def test_pictures_have_the_pixels_of_torchvisions_path(tmp_path, shape):
    """The pictures' fast path: upscaling by repeated pixels is nearest-neighbour
    interpolation; save_png's file holds save_image's pixels (one grey channel where the
    three are equal, three channels otherwise)."""
    import torch.nn.functional as F
    from PIL import Image
    from torchvision.utils import save_image

    from vaelab import pictures as pics

    images = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    factor = max(1, -(-32 // shape[-1]))
    expected = F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images
    assert torch.equal(pics.upscale(images, 32), expected)

    grid = pics.grid(images, nrow=4)
    pics.save_png(grid, tmp_path / "fast.png")
    save_image(grid, tmp_path / "torchvision.png")
    fast, reference = Image.open(tmp_path / "fast.png"), Image.open(tmp_path / "torchvision.png")
    assert fast.mode == ("L" if shape[1] == 1 else "RGB") and reference.mode == "RGB"
    assert np.array_equal(np.asarray(fast.convert("RGB")), np.asarray(reference))


class _Points:
    """A logger that keeps what it is sent, and ``points(key)``: the steps it had ``key`` at."""

    def __new__(cls):
        from lightning.pytorch.loggers import Logger

        class Record(Logger):
            name, version = "record", 0

            def __init__(self):
                super().__init__()
                self.rows: list[tuple[int, dict]] = []

            def log_hyperparams(self, *args, **kwargs):
                pass

            def log_metrics(self, metrics, step=None):
                self.rows.append((step, dict(metrics)))

            def points(self, key):
                return [step for step, m in self.rows if key in m]

        return Record()



@pytest.mark.parametrize("every", [1, 2])
def test_under_gradient_accumulation_the_step_values_are_one_point_a_step_over_its_batches(every):
    """accumulate_grad_batches=4: Lightning's 'log now' flag stays up for all four batches of a
    logged step, and each logged a point (the first the interval's mean, the rest one batch
    each, at one step). One point a logged step, the mean over every batch since the last."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    record = _Points()
    images = torch.bernoulli(torch.full((64, 1, 8, 8), 0.3))
    data = DataLoader(TensorDataset(images, torch.zeros(64)), batch_size=4)  # 16 batches: 4 optimizer steps
    trainer = pl.Trainer(max_epochs=1, logger=record, accumulate_grad_batches=4, log_every_n_steps=every,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", limit_val_batches=0)
    trainer.fit(_tiny_module(), data)
    points = [(step, m["train/elbo"]) for step, m in record.rows if "train/elbo" in m]
    assert [step for step, _ in points] == ([0, 1, 2, 3] if every == 1 else [1, 3])
    (epoch,) = [m["train/elbo_epoch"] for _, m in record.rows if "train/elbo_epoch" in m]
    # each point is over the same number of examples: their mean is the epoch's
    assert sum(v for _, v in points) / len(points) == pytest.approx(epoch, abs=1e-4)


def _nan_at(module, calls):
    """The objective's KL is NaN at these training calls (counted from 1): a diverging step."""
    seen = {"n": 0}

    def hook(objective, args, kwargs, out):
        if kwargs.get("step") is not None:
            seen["n"] += 1
            if seen["n"] in calls:
                out.terms["kl"] = out.terms["kl"] * float("nan")
                out.terms["elbo"] = out.terms["recon"] - out.terms["kl"]
                out.loss = -out.terms["elbo"].mean()
        return out

    module.objective.register_forward_hook(hook, with_kwargs=True)


def test_steps_before_a_stop_and_skipped_logging_steps_have_their_points():
    """Every step is in a curve: training stopped by an error logs the steps since its last point
    as a point of their own (they were in none, and a resumed run does not log them either); with
    nan_policy=skip, a logging step that is skipped still has its point (the interval's good
    steps, and the count of skipped ones), where it had none."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    images = torch.bernoulli(torch.full((64, 1, 8, 8), 0.3))
    data = DataLoader(TensorDataset(images, torch.zeros(64)), batch_size=4)  # 16 steps an epoch

    class StopAt(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 8:
                raise RuntimeError("stopped on purpose")

    record = _Points()
    trainer = pl.Trainer(max_epochs=1, logger=record, log_every_n_steps=5, callbacks=[StopAt()],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", limit_val_batches=0)
    with pytest.raises(RuntimeError, match="stopped on purpose"):
        trainer.fit(_tiny_module(), data)
    assert record.points("train/elbo") == [4, 7]  # steps 0-4, then 5-7 at the stop

    module = _tiny_module()
    module.nan_guard.policy = "skip"
    _nan_at(module, {5, 7})  # steps 4 (a logging step) and 6
    record = _Points()
    trainer = pl.Trainer(max_epochs=1, logger=record, log_every_n_steps=5, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         limit_val_batches=0)
    trainer.fit(module, data)
    assert record.points("train/skipped_steps") == [4, 9, 14, 15]
    skipped = [m["train/skipped_steps"] for _, m in record.rows if "train/skipped_steps" in m]
    assert skipped == [1.0, 2.0, 2.0, 2.0]
    assert record.points("train/elbo") == [4, 9, 14, 15]  # step 4's point: the mean of steps 0-3



def test_a_max_steps_limit_within_an_epoch_validates_its_last_step(tmp_path):
    """trainer.max_steps that ends training inside an epoch: a validation follows its last step,
    so the final weights are validated and can be the best checkpoint (Lightning's loop ended
    without one: the test took an earlier epoch's best, or, stopped before the first
    validation, found no val/elbo to choose by)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    images = torch.bernoulli(torch.full((64, 1, 8, 8), 0.3))
    data = DataLoader(TensorDataset(images, torch.zeros(64)), batch_size=4)  # 16 steps an epoch
    val = DataLoader(TensorDataset(images[:8], torch.zeros(8)), batch_size=4)
    for max_steps, validated in ((6, [5]), (22, [15, 21]), (16, [15])):
        record = _Points()
        best = ModelCheckpoint(dirpath=tmp_path / str(max_steps), monitor="val/elbo", mode="max", save_last=True)
        trainer = pl.Trainer(max_steps=max_steps, logger=record, callbacks=[best], enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", log_every_n_steps=50)
        trainer.fit(_tiny_module(), data, val)
        assert trainer.global_step == max_steps and record.points("val/elbo") == validated
        assert best.best_model_score is not None and best.best_model_path
        saved = torch.load(best.last_model_path, map_location="cpu", weights_only=True)
        assert saved["global_step"] == max_steps
    # the test after the fit adds them no second time (Lightning said they replaced themselves)
    module = trainer.lightning_module
    assert [type(cb).__name__ for cb in module.configure_callbacks()] == []
    module._trainer = None
    assert [type(cb).__name__ for cb in module.configure_callbacks()] == ["PendingStepValues", "ValidateAtMaxSteps"]


def test_under_ddp_every_process_stops_at_a_nan_on_any_one():
    """A NaN on one process alone (its shard, its noise): every process decides from every
    process's number, so all stop at that step with the NaN named. The process whose numbers
    were finite went on into the gradients' all-reduce, which failed with a gloo "connection
    closed" that the run's summary.json recorded instead (helper 35)."""
    from types import SimpleNamespace

    from vaelab.guards import NaNGuard, NonFiniteLossError

    good = {k: torch.ones(2) for k in ("elbo", "recon", "kl")}
    out = SimpleNamespace(loss=torch.tensor(2.0), terms=good)
    sums = torch.stack(list(good.values())).sum(-1)
    gathered = []

    def trainer(other):
        def all_gather(t):
            gathered.append(t.clone())
            return torch.stack([t, torch.full_like(t, other)])

        def reduce(t, reduce_op):
            assert reduce_op == "sum"
            return t + other
        return SimpleNamespace(world_size=2, global_rank=0, max_epochs=3, checkpoint_callback=None,
                               strategy=SimpleNamespace(all_gather=all_gather, reduce=reduce))

    module = SimpleNamespace(global_step=7, current_epoch=0, _trainer=trainer(float("nan")))
    with pytest.raises(NonFiniteLossError, match=r"at step 7 \(epoch 1/3\): the loss is not finite on process 1 of 2 "
                                                 r"\(its own message names its term\)\. Stopped.*objective.warmup>0\.$"):
        NaNGuard("stop").bad_step(module, torch.zeros(2, 1, 2, 2), out, sums)
    assert [t.numel() for t in gathered] == [1]  # which process: gathered once one had it
    module._trainer = trainer(3.0)  # all finite: on, with one sum over the processes and no gather
    assert not NaNGuard("stop").bad_step(module, torch.zeros(2, 1, 2, 2), out, sums)
    assert len(gathered) == 1

