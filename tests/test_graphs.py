"""model.cuda_graph (vaelab.graphs): the training step recorded as CUDA graphs and replayed.

On a machine without CUDA the code around the graphs runs with ``_EagerRecorder`` standing in
for the recording (a replay re-runs the work into the recorded output buffers, as a graph's
replay writes into them); the tests marked ``cuda`` record real graphs and run where a GPU is.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vaelab.graphs import StepGraph, graph_key

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _linear_step(device: str):
    """A deterministic loss of x (so graph and eager agree to the last bit) with two outputs."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 6)).to(device)

    def fn(x):
        err = (net(x) - x) ** 2
        per_example = err.sum(-1)
        return per_example.mean(), torch.stack([per_example, -per_example]).detach().sum(-1)

    return net, fn


@pytest.mark.parametrize("device", DEVICES)
def test_a_replay_gives_the_eager_loss_and_gradients(device):
    net, fn = _linear_step(device)
    x0, x1 = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    graph = StepGraph(fn, list(net.parameters()), x0, emulate=device == "cpu")
    loss, sums = graph(x1)
    assert not sums.requires_grad and loss.requires_grad
    loss.backward()
    graphed = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    eager_loss, eager_sums = fn(x1)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss.detach())
    torch.testing.assert_close(sums, eager_sums)
    for g, p in zip(graphed, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_of_two_replays_accumulate_as_two_eager_backwards(device):
    """Gradient accumulation (trainer.accumulate_grad_batches): autograd adopts a returned
    gradient as param.grad; handing out the graph's own buffer would let the second backward
    overwrite the first (the second micro-batch counted twice)."""
    net, fn = _linear_step(device)
    x1, x2 = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    graph = StepGraph(fn, list(net.parameters()), x1, emulate=device == "cpu")
    for x in (x1, x2):
        graph(x)[0].backward()
    accumulated = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    for x in (x1, x2):
        fn(x)[0].backward()
    for g, p in zip(accumulated, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_a_batch_of_another_shape_or_precision_has_another_key():
    key = graph_key(torch.zeros(8, 1, 4, 4))
    assert key == graph_key(torch.ones(8, 1, 4, 4))
    assert key != graph_key(torch.zeros(5, 1, 4, 4))
    assert key != graph_key(torch.zeros(8, 1, 4, 4, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert key != graph_key(torch.zeros(8, 1, 4, 4))


# --- VAEModule with model.cuda_graph ---------------------------------------------------------

def _module(*overrides: str):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from vaelab.module import VAEModule

    with initialize_config_module(config_module="vaelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", "latent_dim=2", "encoder.hidden=[16]", "decoder.hidden=[16]",
                                          "data.binarize=dynamic", "paths.data_dir=.", "paths.output_dir=.",
                                          "optim.optimizer.lr=3e-2", *overrides])
    config = OmegaConf.to_container(cfg, resolve=True)
    info = {"name": "digits", "shape": (1, 8, 8), "num_levels": 17, "binary": True, "binarize": "dynamic",
            "dequantize": False, "bin_width": 1.0}
    torch.manual_seed(0)
    return VAEModule(config=config, data_info=info)


def _images(n: int = 70) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    pattern = (torch.rand(3, 1, 8, 8, generator=g) < 0.3).float()
    return pattern[torch.arange(n) % 3]  # three images, repeated: a model learns them quickly


def _fit(module, epochs: int = 3, accelerator: str = "cpu", callbacks=(), **trainer_args):
    """70 images in batches of 16: four full batches and one of 6 an epoch."""
    loader = DataLoader(TensorDataset(_images().to("cuda" if accelerator == "gpu" else "cpu"), torch.zeros(70)),
                        batch_size=16)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator=accelerator, devices=1,
                         callbacks=list(callbacks), **trainer_args)
    elbos = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            elbos.append(float(trainer.callback_metrics["train/elbo_epoch"]))

    trainer.callbacks.append(Record())
    trainer.fit(module, loader)
    return trainer, elbos


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr("vaelab.module._EMULATE_GRAPHS_ON_CPU", True)


def test_training_replays_the_graph_for_full_batches_and_runs_the_last_one_eagerly(emulated):
    module = _module("model.cuda_graph=true")
    replayed = []

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            graph = pl_module._step_graph
            replayed.append(0 if graph is None else graph.replays)

    trainer, elbos = _fit(module, epochs=3, callbacks=[Count()])
    assert module._step_graph is not None
    # 5 batches an epoch, the fifth of 6 images: eager (it would need a graph of its own)
    assert replayed[:5] == [1, 2, 3, 4, 4] and module._step_graph.replays == 12
    assert trainer.global_step == 15  # every batch an optimizer step, graphed or not
    assert elbos[-1] > elbos[0] + 5, elbos
    # the same training without the graph: other random draws, the same epoch means within
    # noise (a replay's sums counted twice in the epoch mean once made them -24 against -42)
    _, eager = _fit(_module("model.cuda_graph=false"), epochs=3)
    assert all(abs(a - b) < 2.0 for a, b in zip(elbos, eager, strict=True)), (elbos, eager)


def test_kl_warmup_steps_run_eagerly_and_the_graph_is_recorded_at_the_final_beta(emulated):
    module = _module("model.cuda_graph=true", "objective.warmup=6")
    recorded_at = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module._step_graph is not None and not recorded_at:
                recorded_at.append(trainer.global_step - 1)  # the step that recorded it

    _fit(module, epochs=3, callbacks=[Watch()])
    assert recorded_at == [6]  # β = min(1, step / 6): 1 from step 6 on
    # steps 6..14 of which the partial batches at 9 and 14 are eager: 7 replays
    assert module._step_graph.replays == 7


def test_a_nan_in_a_replayed_step_stops_the_run_naming_the_term(emulated):
    from vaelab.guards import NonFiniteLossError

    class Poison(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.vae.decoder.net[-1].bias.fill_(float("nan"))  # in place: the graph sees it

    module = _module("model.cuda_graph=true")
    with pytest.raises(NonFiniteLossError, match=r"step 2 .*train/recon is NaN"):
        _fit(module, epochs=1, callbacks=[Poison()])
    assert module._step_graph.replays == 3  # steps 0 and 1, and step 2, which stopped before backward


def test_cuda_graph_true_without_a_gpu_is_refused_naming_the_fixes_and_auto_trains_eagerly():
    with pytest.raises(ValueError, match=r"model.cuda_graph=true .*CUDA GPU.*model.cuda_graph=auto"):
        _fit(_module("model.cuda_graph=true"), epochs=1)
    module = _module("model.cuda_graph=auto")
    _, elbos = _fit(module, epochs=2)
    assert module._step_graph is None and len(elbos) == 2


def test_a_step_that_cannot_be_recorded_trains_eagerly_under_auto_and_stops_under_true(emulated, monkeypatch):
    """What a plugin that reads a tensor on the host does to a recording (the error is CUDA's)."""
    import vaelab.module

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(vaelab.module, "StepGraph", refuse)
    module = _module("model.cuda_graph=auto")
    with pytest.warns(UserWarning, match="recording the training step as a CUDA graph failed.*training eagerly"):
        _, elbos = _fit(module, epochs=2)
    assert module._step_graph is None and len(elbos) == 2 and elbos[-1] > elbos[0]
    with pytest.raises(RuntimeError, match=r"stream is capturing.*Use model.cuda_graph=false"):
        _fit(_module("model.cuda_graph=true"), epochs=1)


def test_bad_cuda_graph_values_are_refused():
    from vaelab.validation import value_problems

    assert value_problems({"model": {"cuda_graph": 1}}) == [
        "model.cuda_graph must be true, false or auto, got 1 (e.g. model.cuda_graph=auto)"]
    assert value_problems({"model": {"cuda_graph": "auto"}}) == []
    with pytest.raises(ValueError, match="choose one"):
        _module("model.cuda_graph=true", "model.compile=true")
    assert _module("model.cuda_graph=auto", "model.compile=true").cuda_graph is False


PLUGINS = [
    ("likelihood=bernoulli",), ("likelihood=continuous_bernoulli",), ("likelihood=gaussian",),
    ("likelihood=gaussian", "likelihood.sigma=learned"), ("likelihood=gaussian", "likelihood.sigma=per_pixel"),
    ("likelihood=laplace",), ("likelihood=categorical",), ("likelihood=discretized_logistic_mixture",),
    ("prior=learned_gaussian",), ("prior=mog",), ("prior=vamp",), ("prior=flow",),
    ("posterior=full_gaussian",), ("posterior=iaf",), ("objective=iwae",), ("objective.free_bits=0.1",),
    ("encoder=conv", "decoder=conv"),
]


def _plugin_module(overrides: tuple[str, ...]):
    """A module of these plugins and a batch of data they accept."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from vaelab.module import VAEModule

    binary = not any(o.startswith("likelihood=") and o != "likelihood=bernoulli" for o in overrides)
    sizes = (["encoder.channels=[4,8]", "decoder.channels=[8,4]"] if "encoder=conv" in overrides
             else ["encoder.hidden=[16]", "decoder.hidden=[16]"])
    if {"prior=mog", "prior=vamp"} & set(overrides):
        sizes.append("prior.num_components=4")
    with initialize_config_module(config_module="vaelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", "latent_dim=3", "paths.data_dir=.", "paths.output_dir=.",
                                          *overrides, *sizes])
    config = OmegaConf.to_container(cfg, resolve=True)
    levels = 256
    info = {"name": "test", "shape": (1, 8, 8), "num_levels": 2 if binary else levels, "binary": binary,
            "binarize": "static" if binary else "none", "dequantize": False, "bin_width": 1.0 if binary else 1 / 255}
    torch.manual_seed(0)
    x = torch.randint(0, 2 if binary else levels, (16, 1, 8, 8)).float() / (1 if binary else levels - 1)
    return VAEModule(config=config, data_info=info), x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("overrides", PLUGINS, ids=lambda o: ",".join(o))
def test_every_plugin_records_and_a_replay_gives_a_bound_and_gradients_like_an_eager_step(device, overrides):
    """On a GPU: nothing in any plugin reads the device from the host or changes shapes (the
    recording would fail). Everywhere: the replayed bound is the eager one within the noise of
    the sampling, and every parameter the eager step trains gets a finite gradient."""
    module, x = _plugin_module(overrides)
    module, x = module.to(device), x.to(device)
    params = list(module.parameters())
    graph = StepGraph(module._graph_step_function, params, x, emulate=device == "cpu")
    replayed = []
    for _ in range(8):
        loss, sums = graph(x)
        replayed.append(float(sums[0]) / x.shape[0])
    loss.backward()
    graphed_grads = {id(p): p.grad for p in params if p.grad is not None}
    module.zero_grad(set_to_none=True)
    eager = [float(module.objective(module.vae, x).terms["elbo"].detach().mean()) for _ in range(8)]
    module.objective(module.vae, x).loss.backward()
    trained = [p for p in params if p.grad is not None]
    assert trained and {id(p) for p in trained} == set(graphed_grads)
    assert all(bool(torch.isfinite(graphed_grads[id(p)]).all()) for p in trained)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    spread = max(max(eager) - min(eager), max(replayed) - min(replayed), 1e-3)
    assert abs(mean(replayed) - mean(eager)) < 2 * spread + 0.01 * abs(mean(eager)), (replayed, eager)


# --- on a GPU: real graphs ----------------------------------------------------------------------

@CUDA
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_on_a_gpu_graphed_training_learns_as_eager_training_does(precision):
    graphed = _module("model.cuda_graph=true")
    _, graphed_elbos = _fit(graphed, epochs=6, accelerator="gpu", precision=precision)
    eager = _module("model.cuda_graph=false")
    _, eager_elbos = _fit(eager, epochs=6, accelerator="gpu", precision=precision)
    assert graphed._step_graph is not None and graphed._step_graph.replays == 24
    assert graphed_elbos[-1] > graphed_elbos[0] + 5, graphed_elbos
    # the same model and data, other random draws: the same epoch means within noise over the
    # first epochs (later the two runs' noise has compounded: on an H200, 32-true, epochs 1-3
    # differed by 0.0 / 0.6 / 0.4 nats and epoch 6 by 2.3, at -10 and -12)
    for graphed_elbo, eager_elbo in zip(graphed_elbos[:3], eager_elbos[:3], strict=True):
        assert abs(graphed_elbo - eager_elbo) < 0.05 * abs(eager_elbo) + 1.0, (graphed_elbos, eager_elbos)


@CUDA
def test_on_a_gpu_accumulated_and_clipped_gradients_go_through_the_graph():
    module = _module("model.cuda_graph=true")
    _, elbos = _fit(module, epochs=4, accelerator="gpu", accumulate_grad_batches=2, gradient_clip_val=1.0)
    assert module._step_graph.replays == 16 and elbos[-1] > elbos[0], elbos
