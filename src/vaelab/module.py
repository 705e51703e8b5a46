"""The LightningModule: composes the plain-torch VAE with an objective, an optimizer, and
logging. The math lives in ``vaelab.vae``, ``vaelab.objectives`` and the plugin modules.

The module is built from the run's resolved config (plain dicts and numbers) and the data's
facts (``data_info``); both are saved in every checkpoint, so a checkpoint rebuilds its model
without the original command line (``vaelab.checkpoints.load_module``).
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torchmetrics import MeanMetric, SumMetric

from vaelab.attributes import PlainAttributes
from vaelab.build import (
    allowed_prefixes,
    build_optimizer,
    build_vae,
    check_targets,
    is_plateau_scheduler,
)
from vaelab.diagnostics import PosteriorStats, collapse_message, update_posterior_stats
from vaelab.errors import SettingError
from vaelab.graphs import StepGraph
from vaelab.guards import NaNGuard
from vaelab.metrics import PendingSumMean, PendingSums, SumMean, bits_per_dim
from vaelab.objectives import Objective, ObjectiveOutput
from vaelab.options import TERMS, checkpoint_monitor, is_cuda_graph_choice
from vaelab.profiling import skip_empty_batch_hooks
from vaelab.vae import largest_pass, pass_plan
from vaelab.validation import value_problems

log = logging.getLogger("vaelab")


#: torch.compile's modes (``model.compile_mode``); reduce-overhead replays CUDA graphs on a GPU
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: tests set this to exercise the code around the graphs on a CPU (vaelab.graphs._EagerRecorder)
_EMULATE_GRAPHS_ON_CPU = False

DEFAULT_EVALUATION = {"val_num_samples": 10, "test_num_samples": 1000, "chunk_size": 100, "pass_size": "auto"}

#: ``evaluation.pass_size: auto`` on a CPU: importance samples per forward pass, all examples
#: together. On this project's 2-core CPU (benchmarks/evaluation.py, K = 10) the conv model took
#: 0.83-0.86 ms an image in passes of 500-2,048 samples, and 1.4-1.8 ms in passes of 4,096-8,192,
#: whose activations (the largest 0.5-1 GiB) outgrow the 1 GiB of freed memory the allocator keeps
#: (vaelab.build.keep_freed_memory), so that every pass faults its pages in afresh; the MLP at
#: K = 100 took 0.89 ms in passes of 1,024 and 0.87 ms in 2,048-4,096. 1,024 leaves a conv net
#: with twice these activations room. On a GPU auto leaves the passes as they were (a batch ×
#: chunk_size samples): fewer, larger passes keep it busy.
CPU_PASS_SIZE = 1024


def check_evaluation(settings: dict[str, Any]) -> dict[str, Any]:
    """Refuse importance-sampling settings that cannot work, before any training: the
    ``evaluation.*`` rules of ``vaelab.validation`` (which checks a train.py config), for
    settings from a checkpoint or eval.py. A key left out counts as null."""
    problems = value_problems({"evaluation": {key: settings.get(key) for key in DEFAULT_EVALUATION}})
    if problems:
        raise SettingError("; ".join(problems))
    return settings


def pass_size_for(setting: int | str | None, device: torch.device) -> int | None:
    """``evaluation.pass_size`` on ``device``: auto starts at ``CPU_PASS_SIZE`` on a CPU and
    without a bound elsewhere (``VAEModule`` halves it where a pass runs out of memory)."""
    if setting == "auto":
        return CPU_PASS_SIZE if device.type == "cpu" else None
    return setting  # type: ignore[return-value]


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device running out of memory: torch's ``OutOfMemoryError`` (CUDA
    and other accelerators) or the CPU allocator's refusal, a plain ``RuntimeError``."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error))


def _free_memory(device: torch.device) -> None:
    """Give what a failed pass held back to the device (its tensors are garbage once the
    exception that referenced them is gone)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class PendingStepValues(pl.Callback):
    """A training stopped by an error, a NaN, SIGTERM or Ctrl-C logs the steps since its last
    point as a point of their own before Lightning finalizes the loggers (they were in no curve,
    neither in the stopped part nor in a resumed one)."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or not isinstance(pl_module, VAEModule):
            return
        try:
            pl_module.log_pending_step_values()
        except Exception as error:  # never in the way of the error that stopped the run
            log.warning("vaelab: the steps since the last logged point could not be logged (%s: %s)",
                        type(error).__name__, error)


class ValidateAtMaxSteps(pl.Callback):
    """``trainer.max_steps`` that ends training within an epoch: a validation runs after its
    last step, as after an epoch's last, so that the final weights are validated, can be the
    best checkpoint and so be tested. Lightning's loop ended without one: the test took the best
    of the earlier validations (with nothing said of the steps after it), or, before the first,
    found no val/elbo to choose a checkpoint by. Its own test for a validation after a step
    runs one where training is told to stop, which this does at the last step; an epoch that
    does not validate (``check_val_every_n_epoch``) still does not."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_steps in (None, -1):
            self.on_train_batch_end = None  # no step limit: Lightning's loop skips the hook

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # (before the checkpoint callbacks' hooks, which Lightning runs last: they see the
        # validation that follows)
        if trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class VAEModule(PlainAttributes, pl.LightningModule):
    """Logs, per step and per epoch, in nats per example:

    * ``train/elbo``, ``train/recon`` (E_q[log p(x|z)]), ``train/kl`` (KL(q(z|x) ‖ p(z))),
      ``train/loss`` (what is minimized: −(recon − β·kl), or the objective's own loss), each
      the mean over the examples of the steps since the previous logged point (every
      ``trainer.log_every_n_steps``), and ``train/beta`` (the effective β of the step, after KL
      warm-up); the epoch means as ``train/elbo_epoch``, ..., ``train/loss_epoch``; any further
      per-example term of the objective (``train/iwae`` for objective=iwae) the same way.
    * ``val/elbo``, ``val/recon``, ``val/kl`` and ``val/iwae`` (IWAE bound with K =
      ``evaluation.val_num_samples``).
    * ``test/elbo``, ``test/recon``, ``test/kl``, ``test/nll`` (−log p(x) by importance sampling
      with K = ``evaluation.test_num_samples``) and ``test/bpd``; ``test/gap`` (log p̂(x) − ELBO,
      the mean over test examples) and ``test/active_units`` (``vaelab.diagnostics``).

    Epoch numbers are exact means over the examples (torchmetrics, reduced across processes).
    """

    #: set by Lightning before and after every hook it calls, some forty times a training step
    PLAIN_ATTRIBUTES = frozenset({"_current_fx_name"})

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, allowed_targets: Sequence[str] = (), **kwargs: Any) -> VAEModule:
        """Lightning's ``load_from_checkpoint`` by way of ``vaelab.checkpoints.load_module``: the
        stored config's targets are checked against this call's ``allowed_targets`` (a file's own
        list does not count) before anything is built. Lightning's would build what the file's
        config names, with the prefixes the file itself allows."""
        from vaelab.checkpoints import load_module

        if hparams_file is not None or kwargs or strict is False:
            raise TypeError("VAEModule.load_from_checkpoint takes checkpoint_path, map_location and allowed_targets: "
                            "the checkpoint's config rebuilds the model")
        return load_module(checkpoint_path, map_location=map_location or "cpu", allowed_targets=allowed_targets)

    def __init__(self, config: dict[str, Any], data_info: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.config = config
        self.data_info = data_info
        self.vae = build_vae(config, data_info["shape"], data_info.get("num_levels"))
        model = config.get("model") or {}
        mode = model.get("compile_mode") or "default"
        if mode not in COMPILE_MODES:
            raise SettingError(f"model.compile_mode={mode!r} is not an option: choose one of {COMPILE_MODES}")
        compiled = bool(model.get("compile", False))
        cuda_graph = model.get("cuda_graph", False)
        if not is_cuda_graph_choice(cuda_graph):
            raise SettingError(f"model.cuda_graph={cuda_graph!r} is not an option: choose one of false, true, auto")
        if cuda_graph is True and compiled:
            raise SettingError("model.cuda_graph=true and model.compile=true: choose one (model.compile_mode="
                             "reduce-overhead graphs the compiled networks; model.cuda_graph the whole step)")
        #: false | true | auto (vaelab.graphs); auto stays eager where graphs cannot work
        self.cuda_graph = False if cuda_graph == "auto" and compiled else cuda_graph
        self._step_graph: StepGraph | None = None
        self._graph_off = self.cuda_graph is False
        if compiled:
            # in place (nn.Module.compile), not torch.compile(module): the parameters keep their
            # names, so a checkpoint loads into a compiled or an eager model alike
            self.vae.encoder.compile(mode=mode)
            self.vae.decoder.compile(mode=mode)
        check_targets({"objective": config["objective"]}, allowed_prefixes(config))
        self.objective: Objective = instantiate(config["objective"])
        self.evaluation = check_evaluation({**DEFAULT_EVALUATION, **(config.get("evaluation") or {})})
        self.num_dims = math.prod(data_info["shape"])
        self._check_likelihood_fits_data()
        self._distribution_checked = False  # (against a batch: on_train_batch_start, on_test_batch_start)
        #: the per-example terms logged in training: elbo, recon, kl and the objective's own
        self.train_terms = (*TERMS, *getattr(self.objective, "extra_terms", ()))
        #: what training adds up per step (the terms and the loss): the epoch means and the
        #: logged step values (means over each logging interval) both come from these sums
        self.train_sum_names = (*self.train_terms, "loss")
        # the terms of every step: SumMean, fed with the batch sums that _term_sums computes once
        # for all terms; in training through one PendingSums (one in-place addition a step for
        # all terms, folded into the metrics whenever they are read). No NaN scan per update (a
        # device->host sync every step on a GPU): the NaN guard keeps non-finite training steps
        # out (stop or skip); a NaN in validation or test shows as NaN in the epoch mean
        # instead of being silently dropped.
        self.train_sums = PendingSums()
        #: whether this epoch's means are registered with Lightning yet (training_step)
        self._epoch_means_logged = False
        self.metrics = torch.nn.ModuleDict(
            {f"train_{name}": PendingSumMean(self.train_sums) for name in self.train_sum_names}
            | {f"{stage}_{term}": SumMean() for stage in ("val", "test") for term in TERMS}
        )
        for name in ("val_iwae", "test_nll"):  # per-example vectors, once a validation/test batch
            self.metrics[name] = MeanMetric(nan_strategy="disable")
        # how many test examples the test numbers average over: the whole split, each once,
        # also under DDP (summed across processes)
        self.metrics["test_count"] = SumMetric(nan_strategy="disable")
        self._kl_reported = False
        # test/gap, and the posterior diagnostics of the test split (vaelab.diagnostics)
        self.metrics["test_gap"] = MeanMetric(nan_strategy="disable")
        self.posterior_stats = PosteriorStats(self.vae.latent_dim)
        self.test_diagnostics: dict[str, Any] = {}
        self.nan_guard = NaNGuard.from_config(config)  # nan_policy: stop | skip (vaelab.guards)
        #: evaluation.pass_size=auto after a pass ran out of memory: the bound that worked
        self.auto_pass_size: int | None = None
        #: the step values last sent to the loggers (floats), for the progress bar
        self.last_step_values: dict[str, float] = {}
        self._step_scalars: dict[str, Any] = {}  # the last training step's train/beta, ...

    def _check_likelihood_fits_data(self) -> None:
        lik = self.vae.likelihood
        if lik.requires_binary and not self.data_info["binary"]:
            if self.data_info["num_levels"] == 2:  # binary, dequantized: x = (k + u) / 2 in [0, 1)
                raise SettingError(
                    f"likelihood={type(lik).__name__} needs binary data, but data={self.data_info['name']} "
                    "with data.dequantize=true holds x = (k + u)/2 with uniform noise u, not 0 or 1. Use "
                    "data.dequantize=false, or a density on intensities (e.g. likelihood=gaussian)."
                )
            raise SettingError(
                f"likelihood={type(lik).__name__} needs binary data, but data={self.data_info['name']} "
                f"has {self.data_info['num_levels']} grey levels and data.binarize="
                f"{self.data_info['binarize']}. Use data.binarize=dynamic (or static), or "
                "likelihood=continuous_bernoulli / likelihood=gaussian for intensities."
            )
        if lik.requires_levels and (
            lik.num_levels != self.data_info["num_levels"]
            or self.data_info["binarize"] != "none"
            or self.data_info["dequantize"]
        ):
            fixes = []
            if self.data_info["binarize"] != "none" or self.data_info["dequantize"]:
                fixes.append("data.binarize=none data.dequantize=false (it needs the stored intensities)")
            if lik.num_levels != self.data_info["num_levels"]:
                fixes.append(f"likelihood.{'num_bins' if hasattr(lik, 'num_bins') else 'num_classes'}=null "
                             f"(the data's {self.data_info['num_levels']} levels)")
            raise SettingError(
                f"likelihood={type(lik).__name__} is a distribution over {lik.num_levels} intensity "
                f"levels x = k/{lik.num_levels - 1}, but data={self.data_info['name']} has "
                f"{self.data_info['num_levels']} levels, data.binarize={self.data_info['binarize']} and "
                f"data.dequantize={self.data_info['dequantize']}. Use {' and '.join(fixes)}."
            )
        lo, hi = lik.support
        if lo > 0.0 or hi < 1.0:
            raise SettingError(f"likelihood {type(lik).__name__} has support {lik.support}, but data lie in [0, 1]")

    def _check_distribution_fits_data(self, x: torch.Tensor) -> None:
        """What the likelihood's class declares, checked against the distribution it returns
        and a batch of the data, once a run: a plugin that returns a distribution over discrete
        values (a Bernoulli) but inherits ``discrete = False`` got dequantized intensities from
        ``data.dequantize=auto`` and the bin width of a density in test/bpd, and scored values
        outside its support without a word (zuko, which vaelab imports, turns off torch's own
        argument checks for every distribution)."""
        self._distribution_checked = True
        lik = self.vae.likelihood
        with torch.no_grad():
            z = torch.zeros(1, self.vae.latent_dim, device=x.device, dtype=x.dtype)
            try:
                support = lik(self.vae.decoder(z)).support
            except NotImplementedError:  # (a distribution that declares none)
                return
        name = type(lik).__name__
        if support.is_discrete and not lik.discrete:
            raise SettingError(
                f"likelihood {name} returns a distribution over discrete values (support {support}), but its class "
                "declares discrete = False, so data.dequantize=auto and test/bpd take it for a density. Set the "
                "class attributes discrete = True (and requires_binary = True for a distribution over 0 and 1, "
                "or requires_levels = True over intensity levels) (README: Adding a plugin)."
            )
        if not support.check(x[:256]).all():
            raise SettingError(
                f"likelihood {name}: the data (data={self.data_info['name']}, data.binarize="
                f"{self.data_info['binarize']}, data.dequantize={self.data_info['dequantize']}; values from "
                f"{x.min().item():.4g} to {x.max().item():.4g}) lie outside its distribution's support {support}. Choose "
                "the data settings it needs (data.binarize=dynamic for a distribution over 0 and 1), or set its "
                "class attributes (discrete, requires_binary, requires_levels, support) so that "
                "data.binarize=auto and data.dequantize=auto choose them (README: Adding a plugin)."
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._distribution_checked:
            self._check_distribution_fits_data(batch[0])

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._distribution_checked:
            self._check_distribution_fits_data(batch[0])

    # --- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the steps nan_policy=skip has skipped, so that max_skipped_steps counts a resumed run's too
        checkpoint["nan_guard"] = {"skipped": int(self.nan_guard.skipped)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nan_guard.skipped = int((checkpoint.get("nan_guard") or {}).get("skipped", 0))

    # --- training -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor):
        return self.objective(self.vae, x)

    def _eval_step(self, stage: str, x: torch.Tensor) -> ObjectiveOutput:
        """The objective on a validation or test batch at the full β (the logged terms are the
        true bounds whatever β is: β only enters the loss), its terms' batch sums added to the
        stage's epoch means."""
        out = self.objective(self.vae, x)
        for term, total in zip(TERMS, self._term_sums(out, TERMS).unbind(), strict=True):
            self.metrics[f"{stage}_{term}"].update(total, x.shape[0])
        self._report_kl(out.analytic_kl)
        return out

    def _report_kl(self, analytic: bool) -> None:
        if not self._kl_reported:
            self._kl_reported = True
            rank_zero_info(
                f"KL(q(z|x) ‖ p(z)) is {'analytic (torch.distributions.kl_divergence)' if analytic else 'a Monte Carlo estimate'}"
                f" for q={type(self.vae.posterior).__name__}, p={type(self.vae.prior).__name__}"
            )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, _ = batch
        graph = self._graph_for(x)
        if graph is not None:
            loss, sums = graph(x)  # the recorded step, replayed (vaelab.graphs)
            terms = sums[: len(self.train_terms)].unbind()
            out = ObjectiveOutput(loss=loss, terms=dict(zip(self.train_terms, terms, strict=True)),
                                  scalars=self._graph_scalars)
        else:
            # warm-up needs the training clock
            out = self.objective(self.vae, x, step=self.global_step, epoch=self.current_epoch)
            sums = self._term_sums(out, self.train_terms, with_loss=True)
            self._report_kl(out.analytic_kl)
        # the NaN guard reads the terms' batch sums, the same numbers on either path
        if self.nan_guard.bad_step(self, x, out, sums, sums_include_loss=True):
            # nan_policy=skip: no backward, no optimizer step (a NaN stops in bad_step); a logging
            # step still has its point: the interval's good steps and the count of skipped ones
            if self._logging_step():
                self._log_step_values(out.scalars)
            return None
        self.train_sums.add(sums, x.shape[0])
        if not self._epoch_means_logged:
            # the epoch means are torchmetrics objects that accumulate every example (see
            # __init__); registering them once an epoch is enough: Lightning computes (reduced
            # across processes) and resets them at the epoch's end. At the epoch's first step
            # trained, which is not batch 0 where that step was skipped (nan_policy=skip) or
            # where a run resumed within the epoch (then the means are over the examples
            # trained since the resume: the metrics' sums are not part of a checkpoint)
            self._epoch_means_logged = True
            for name in self.train_sum_names:
                self.log(f"train/{name}_epoch", self.metrics[f"train_{name}"], on_step=False, on_epoch=True)
        self._step_scalars = out.scalars
        if self._logging_step():
            self._log_step_values(out.scalars)
        return out.loss

    def on_train_epoch_end(self) -> None:
        self._epoch_means_logged = False  # (registered again at the next epoch's first step)
        # the steps since the epoch's last point, in a point of their own: no step is left out of
        # the curves (an epoch's last steps, training's last ones), and no point mixes two epochs
        self.log_pending_step_values()

    def log_pending_step_values(self) -> None:
        """The step values of the steps since the last logged point, as a point of their own at
        the step of the latest batch (as a point logged in its training_step would be): at an
        epoch's end, and where training stops on an error, a NaN or a signal
        (``PendingStepValues``), so that those steps are in the curves too."""
        trainer = self._trainer
        if self.train_sums.pending() and trainer is not None and trainer.loggers:
            self._log_step_values(self._step_scalars, step=trainer.fit_loop.epoch_loop._batches_that_stepped - 1)

    def configure_callbacks(self) -> list[pl.Callback]:
        trainer = self._trainer
        if trainer is not None and any(isinstance(cb, PendingStepValues) for cb in trainer.callbacks):
            return []  # (the test after the fit: Lightning said at every run that they replaced themselves)
        callbacks = [PendingStepValues(), ValidateAtMaxSteps()]
        skip_empty_batch_hooks(callbacks)  # (Lightning's loop need not call their no-op batch hooks)
        return callbacks

    def on_train_start(self) -> None:
        """Step values at least once an epoch: where an epoch has fewer optimizer steps than
        ``trainer.log_every_n_steps`` (a small data set such as the default digits), log every
        epoch's worth of steps instead (each point is the mean over its interval either way)."""
        trainer = self._trainer
        batches = trainer.num_training_batches if trainer is not None else math.inf
        if not math.isfinite(batches) or trainer.log_every_n_steps <= 0:
            return
        steps = max(1, math.ceil(int(batches) / max(1, int(trainer.accumulate_grad_batches))))
        if steps < trainer.log_every_n_steps:
            rank_zero_info(f"vaelab: step values every {steps} steps, once an epoch (an epoch has {steps} "
                           f"optimizer steps, fewer than trainer.log_every_n_steps={trainer.log_every_n_steps})")
            trainer.log_every_n_steps = steps

    # --- CUDA graphs (model.cuda_graph; vaelab.graphs) ------------------------------------------
    def _graph_for(self, x: torch.Tensor) -> StepGraph | None:
        """The recorded step to replay for this batch, recording it on the first batch that
        can be; None for an eager step (graphs off, a batch of another shape such as an
        epoch's last, the steps of a KL warm-up before β is final)."""
        if self._graph_off:
            return None
        if self._step_graph is not None:
            return self._step_graph if self._step_graph.matches(x) else None
        obstacle = self._graph_obstacle(x)
        if obstacle:
            self._graph_off = True
            if self.cuda_graph is True:
                raise SettingError(f"model.cuda_graph=true cannot record this run's training step: {obstacle}. "
                                 "Use model.cuda_graph=auto (graphs where they work) or false.")
            if x.is_cuda:  # (on a CPU, auto quietly means eager)
                rank_zero_info(f"model.cuda_graph=auto: eager training steps ({obstacle})")
            return None
        if self.objective.effective_beta(self.global_step, self.current_epoch) != self.objective.beta:
            return None  # KL warm-up: recorded once β has reached its value (β is fixed in the graph)
        try:
            self._step_graph = StepGraph(self._graph_step_function, list(self.parameters()), x,
                                         emulate=not x.is_cuda)
        except Exception as error:  # noqa: BLE001 - any failure to record means eager steps, or a stop
            self._graph_off = True
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            message = (f"recording the training step as a CUDA graph failed ({type(error).__name__}: {error}); "
                       "a plugin that reads tensors on the host or changes shapes cannot be recorded")
            if self.cuda_graph is True:
                raise RuntimeError(f"model.cuda_graph=true: {message}. Use model.cuda_graph=false "
                                   "(or auto, which then trains eagerly).") from error
            rank_zero_warn(f"model.cuda_graph=auto: {message}; training eagerly")
            return None
        self._report_kl(self._graph_analytic_kl)
        rank_zero_info(f"model.cuda_graph: training steps replay a CUDA graph (batches of shape {tuple(x.shape)}; "
                       "others run eagerly)")
        return self._step_graph

    def _graph_obstacle(self, x: torch.Tensor) -> str | None:
        """Why this run's step cannot be recorded (None: it can)."""
        if not x.is_cuda and not _EMULATE_GRAPHS_ON_CPU:
            return f"training runs on {x.device.type}, and CUDA graphs need a CUDA GPU (trainer=gpu)"
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            return (f"{trainer.world_size} processes: the graphs are recorded for one process "
                    "(DDP's gradient communication stays outside them)")
        if torch.is_autocast_enabled(x.device.type) and torch.is_autocast_cache_enabled():
            return "autocast with its weight cache on (Lightning's precision plugins turn it off)"
        if not torch.is_grad_enabled():
            return "gradients are off"
        return None

    def _graph_step_function(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the graph records: the objective at its final β and the batch sums of the
        logged terms, as on the eager path."""
        out = self.objective(self.vae, x)
        # host-side facts of the recorded step, fixed with it (β is final): reported on replays
        self._graph_analytic_kl, self._graph_scalars = out.analytic_kl, dict(out.scalars)
        return out.loss, self._term_sums(out, self.train_terms, with_loss=True)

    @staticmethod
    def _term_sums(out: ObjectiveOutput, terms: tuple[str, ...], with_loss: bool = False) -> torch.Tensor:
        """The batch sums of the logged terms in one reduction ([T], or [T + 1] ``with_loss``:
        the loss times the batch size last): the epoch means, the logged step values and the
        NaN guard all read them (per-example terms [B], the objectives' contract)."""
        # detached first: stacking tensors that carry gradients would record an autograd node
        # and a tracked view per input, for numbers that are only read
        values = [out.terms[term].detach() for term in terms]
        if with_loss:  # the scalar loss as a [B] view: summed with the terms, in the same reduction
            values.append(out.loss.detach().to(values[0].dtype).expand_as(values[0]))
        values = torch.stack(values)
        if values.dtype not in (torch.float32, torch.float64):  # float32 terms (float64 under 64-true); a plugin's may be half
            values = values.float()
        return values.sum(-1)

    def _logging_step(self) -> bool:
        """Whether Lightning passes this step's values to the loggers (every
        ``trainer.log_every_n_steps``): values logged on other steps are dropped anyway. Under
        gradient accumulation, only on the batch whose optimizer step runs (as Lightning's own
        step logging): its flag stays up for every batch of that step, and each one logged a
        point of its own, the first over the interval and the others one batch each."""
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)
        if not getattr(connector, "should_update_logs", True):
            return False
        if getattr(trainer, "accumulate_grad_batches", 1) > 1:
            return not trainer.fit_loop._should_accumulate()
        return True

    def _log_step_values(self, scalars: dict[str, float], step: int | None = None) -> None:
        """The ``train/*`` step values, sent to the loggers the way Lightning's logger connector
        sends what ``self.log(on_step=True)`` collected: the same step counter, with ``epoch``
        added, on the same steps (every ``trainer.log_every_n_steps``), from rank zero's values.

        Each term's value (and ``train/loss``) is its mean over every example of the steps since
        the previous logged point, not the last batch's alone (as Hugging Face's Trainer logs
        its loss): the running sums the epoch means use already hold it
        (``PendingSums.interval``), so no step is left out of the curves however rarely they
        are logged, and the points are less noisy. With ``log_every_n_steps=1`` it is each
        step's batch mean. ``train/beta`` (and ``train/skipped_steps``) are this step's.

        Not through ``self.log``: it costs about 0.5 ms a call on this project's CPU
        benchmark, 3.7 ms for these seven values, a third of the MLP VAE's whole step (and
        more than all of it on a GPU). Here the values leave the device in one transfer."""
        sums, count = self.train_sums.interval()
        values: dict[str, float] = {}
        if count:  # (none where every step since the last point was skipped: nan_policy=skip)
            values.update(zip([f"train/{name}" for name in self.train_sum_names], (sums / count).tolist(), strict=True))
        values.update({f"train/{name}": float(value) for name, value in scalars.items()})
        if self.nan_guard.policy == "skip":
            values["train/skipped_steps"] = float(self.nan_guard.skipped)
        self.last_step_values = values
        connector = getattr(self._trainer, "_logger_connector", None)
        if connector is not None and hasattr(connector, "log_metrics"):
            # (Lightning adds "epoch" where it chooses the step itself)
            connector.log_metrics(dict(values) if step is None else {**values, "epoch": self.current_epoch}, step=step)
        elif step is None:  # a Lightning without that method: the ordinary (slower) way
            self.log_dict(values, on_step=True, on_epoch=False, batch_size=1)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        self._eval_step("val", x)
        for term in TERMS:
            self.log(f"val/{term}", self.metrics[f"val_{term}"], on_epoch=True, prog_bar=term == "elbo")
        k = int(self.evaluation["val_num_samples"])
        if k > 0:
            self.metrics["val_iwae"].update(self.log_likelihood(x, k))
            self.log("val/iwae", self.metrics["val_iwae"], on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        # a diverged model stops here, before this epoch's checkpoints (and whatever else an
        # epoch's end does with its numbers) take a non-finite val/elbo for a result
        metric = self.metrics["val_elbo"]
        if metric.update_count:
            self.nan_guard.check_validation(self, float(metric.compute()))
            self.nan_guard.check_against_guessing(self, float(self.metrics["val_recon"].compute()),
                                                  self.uniform_log_likelihood())

    def uniform_log_likelihood(self) -> float | None:
        """log p(x) in nats per example of the model that gives each pixel the uniform
        distribution over its values (−D log 2 for binary data), for a likelihood over the
        data's discrete values; None for a density (its nats are not probabilities)."""
        if not self.vae.likelihood.discrete:
            return None
        levels = 2 if self.data_info["binary"] else int(self.data_info["num_levels"])
        return -self.num_dims * math.log(levels)

    def log_likelihood(self, x: torch.Tensor, num_samples: int) -> torch.Tensor:
        """``VAE.log_likelihood`` with the run's ``evaluation`` settings. With ``pass_size:
        auto`` a pass that runs out of device memory is not the end of the run: the batch starts
        again in passes of half as many samples, and later batches keep the bound that worked
        (``auto_pass_size``, logged). A number (or null) is the user's bound: running out of
        memory with it stops with the fix named."""
        setting = self.evaluation.get("pass_size", "auto")
        chunk_size = int(self.evaluation["chunk_size"])
        while True:
            pass_size = self.auto_pass_size if setting == "auto" and self.auto_pass_size else pass_size_for(setting, x.device)
            try:
                return self.vae.log_likelihood(x, num_samples, chunk_size, pass_size, between=self._stop_if_told)
            except RuntimeError as error:  # (torch.OutOfMemoryError is one)
                if not out_of_memory(error):
                    raise
                tried = largest_pass(x.shape, num_samples, chunk_size, pass_size)
                chunk, rows = pass_plan(x.shape, num_samples, chunk_size, pass_size)
                where = (f"importance sampling ran out of memory on {x.device} in a forward pass of {tried} samples "
                         f"({rows} examples x {chunk} samples, evaluation.pass_size="
                         f"{'null' if setting is None else setting})")
                if setting != "auto":
                    raise torch.OutOfMemoryError(
                        f"{where}. Use evaluation.pass_size=auto (halves the passes until they fit) or a smaller "
                        "number, or lower data.eval_batch_size") from error
                if tried <= 1:
                    raise torch.OutOfMemoryError(f"{where}: one sample at a time does not fit; the model is too "
                                                 "large for this device's free memory") from error
            # (outside the except clause: the failed pass's tensors are released with the exception)
            self.auto_pass_size = tried // 2
            _free_memory(x.device)
            rank = f" (rank {self.global_rank})" if self._trainer is not None and self._trainer.world_size > 1 else ""
            log.info(f"evaluation.pass_size=auto: {where}; passes of at most {self.auto_pass_size} samples "
                     f"from now on{rank}. Set evaluation.pass_size to skip the search")

    def _stop_if_told(self) -> None:
        """Between the forward passes of an importance-sampled estimate: a process told to stop
        (SIGTERM) stops there. Lightning checks only between evaluation batches, and not after
        the last one, so a split of one batch (or its last batch) with K = 1000 ran to its end,
        minutes past a job's time limit, and the run exited 0. On one process only: under DDP
        the ranks learn of the signal at different moments, and one that stops in the middle
        leaves the others waiting for it; nor can they stop together at a test batch, as their
        shards may differ by one example (``eval_sampler``) and so by one batch: there the test
        runs to its end."""
        trainer = self._trainer
        if trainer is not None and trainer.world_size == 1 and trainer.received_sigterm:
            raise SIGTERMException

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        out = self._eval_step("test", x)
        ll = self.log_likelihood(x, int(self.evaluation["test_num_samples"]))
        self.metrics["test_nll"].update(-ll)
        self.metrics["test_gap"].update(ll - out.terms["elbo"].detach())  # log p̂(x) − ELBO(x)
        update_posterior_stats(self.posterior_stats, self.vae, x)
        self.metrics["test_count"].update(torch.tensor(float(x.shape[0]), device=x.device))
        self.log("test/num_examples", self.metrics["test_count"], on_epoch=True)
        for term in TERMS:
            self.log(f"test/{term}", self.metrics[f"test_{term}"], on_epoch=True)
        self.log("test/nll", self.metrics["test_nll"], on_epoch=True)
        self.log("test/gap", self.metrics["test_gap"], on_epoch=True)

    def _metrics_in_model_dtype(self) -> None:
        """Under 64-true the sums and means accumulate in float64, as the densities are computed:
        torchmetrics keeps its states in float32 whatever the module's dtype, so every reported
        number was rounded to float32 (test/kl 1.45e-9 off a float64 reference; helper 18)."""
        dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        for metric in self.metrics.values():
            if metric.dtype != dtype:
                metric.set_dtype(dtype)

    def on_fit_start(self) -> None:
        self._metrics_in_model_dtype()

    def on_test_start(self) -> None:
        self._metrics_in_model_dtype()
        lik, info = self.vae.likelihood, self.data_info
        if not lik.discrete and not info.get("dequantize"):
            rank_zero_warn(
                f"test/bpd converts {type(lik).__name__}'s density at the data's "
                f"{'binary values' if info.get('binary') else 'grid points'} with the bin width "
                f"{info['bin_width']:.4g}: not a bound on the discrete data's bits/dim and not comparable with the "
                "papers' tables (a density can grow without bound there). "
                + ("data.dequantize=true (or auto) makes it one." if not info.get("binary") else
                   "A discrete likelihood (bernoulli) gives the bits/dim of binary data."))

    def on_test_epoch_end(self) -> None:
        nll = self.metrics["test_nll"].compute()
        bpd = bits_per_dim(nll, self.num_dims, self.vae.likelihood.discrete, self.data_info["bin_width"])
        self.log("test/bpd", bpd, sync_dist=True)  # the same on every rank; silences Lightning's DDP warning
        self._log_posterior_diagnostics()

    def _log_posterior_diagnostics(self) -> None:
        """Active units and the KL per dimension over the whole test split (summed across
        processes); kept in ``test_diagnostics`` for the pictures and the summary files."""
        diag = self.posterior_stats.compute()
        self.posterior_stats.reset()
        diag["total_kl"] = float(self.metrics["test_kl"].compute())
        self.test_diagnostics = diag
        # the same on every rank (the statistics are summed across processes); sync_dist
        # silences Lightning's DDP warning, as for test/bpd
        self.log("test/active_units", float(diag["active_units"]), sync_dist=True)
        rank_zero_info(f"active units: {diag['active_units']} of {self.vae.latent_dim} "
                       f"(Cov_x(E_q[z_u]) > {diag['active_threshold']}), KL {diag['total_kl']:.3f} nats")
        message = collapse_message(diag["active_units"], self.vae.latent_dim, diag["total_kl"])
        if message:
            rank_zero_warn(message)

    # --- optimization ----------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optim = self.config["optim"]
        check_targets(optim, allowed_prefixes(self.config))
        trainer = self._trainer
        clipped_in_mixed = (trainer is not None and isinstance(trainer.precision_plugin, MixedPrecision)
                            and bool(trainer.gradient_clip_val))
        # fused where torch has it (not where Lightning clips mixed-precision gradients)
        optimizer = build_optimizer(optim["optimizer"], self.parameters(), clipped_in_mixed)
        if not optim.get("scheduler"):
            return optimizer
        schedule = optim["scheduler"]
        monitor, mode = checkpoint_monitor(self.config)
        plateau = is_plateau_scheduler(schedule)
        # ReduceLROnPlateau steps on the monitored validation number, in the checkpoint's
        # direction (its own default, mode=min, lowered the learning rate while val/elbo rose),
        # at the end of each epoch that validates (check_val_every_n_epoch; not where none ran)
        extra = {"mode": mode} if plateau and "mode" not in schedule else {}
        scheduler = instantiate(schedule, _partial_=True)(optimizer=optimizer, **extra)
        every = (trainer.check_val_every_n_epoch if trainer is not None else None) or 1
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": optim.get("scheduler_interval", "epoch"),
                             "monitor": monitor, "frequency": every if plateau else 1},
        }
