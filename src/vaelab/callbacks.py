"""Lightning callbacks: pictures of what the model does.

Each validation epoch:

* ``val/reconstructions``: a fixed set of validation inputs (top row), the mean of p(x|z) at
  z = the mean of q(z|x) (middle row), and a sample x ~ p(x|z) (bottom row).
* ``val/samples``: the mean of p(x|z) for z ~ p(z), drawn from the same noise every epoch, so
  the grid shows the model changing rather than the noise (a learned prior's z move with it).

At the end of training, ``val/rate_distortion``: (val/kl, −val/recon) per epoch. After testing
(on the test split, with the diagnostics of ``VAEModule.test_diagnostics``):
``test/reconstructions``, ``test/traversals`` (the most active latent dimensions),
``test/interpolations``, ``test/latent_space`` (means of q(z|x) coloured by class, PCA when
Z > 2) and ``test/kl_per_dim`` (also as a W&B table and ``kl_per_dim.csv``).

Each picture goes to every logger that takes images (W&B) and to a PNG file under
``save_dir``, on the rank-zero process only.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from vaelab import pictures as pics
from vaelab.diagnostics import most_active_dims, posterior_mean
from vaelab.errors import epoch_label
from vaelab.precision import upcast
from vaelab.report import write_json


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Draw with a fixed seed (the same pictures every epoch) and leave the training's random
    streams, the device's included, as they were. Seeds the CPU's generator and this device's
    only: ``torch.manual_seed`` would also seed every other GPU's, which ``fork_rng`` does not
    restore, and before CUDA starts it records a traceback for each call (~0.4 ms)."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _finite_pictures(mean: torch.Tensor) -> bool:
    """Whether the decoder's outputs can be drawn: a diverged model's are not, and sampling
    from a distribution whose parameters are NaN fails in torch with a message about its
    arguments (validation then stops the run with the reason: ``NaNGuard.check_validation``)."""
    if bool(torch.isfinite(mean).all()):
        return True
    rank_zero_warn("vaelab: no pictures this time: the decoder's outputs are not finite (the model has diverged)")
    return False


class ImageLogger(pl.Callback):
    def __init__(
        self,
        save_dir: str | None = None,
        num_images: int = 16,
        num_samples: int = 64,
        every_n_epochs: int = 1,
        min_pixels: int = 32,
        seed: int = 0,
        test_pictures: bool = True,
        num_traversal_dims: int = 8,
        traversal_steps: int = 9,
        num_interpolations: int = 4,
        interpolation_steps: int = 8,
        max_latent_points: int = 5000,
    ):
        super().__init__()
        self.save_dir = Path(save_dir) if save_dir else None
        self.num_images = int(num_images)
        self.num_samples = int(num_samples)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.min_pixels = int(min_pixels)
        self.seed = int(seed)
        self.test_pictures = bool(test_pictures)
        self.num_traversal_dims = int(num_traversal_dims)
        self.traversal_steps = int(traversal_steps)
        self.num_interpolations = int(num_interpolations)
        self.interpolation_steps = int(interpolation_steps)
        self.max_latent_points = int(max_latent_points)
        # (epoch, val/kl, val/recon) of every validated epoch: the rate–distortion path
        self.rate_distortion: list[tuple[int, float, float]] = []

    def state_dict(self) -> dict[str, Any]:
        return {"rate_distortion": [list(r) for r in self.rate_distortion]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rate_distortion = [(int(e), float(k), float(r)) for e, k, r in state_dict.get("rate_distortion", [])]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs and not _last_validation(trainer):
            return  # (training's last validation has its pictures whatever every_n_epochs)
        self._log(trainer, pl_module)

    @rank_zero_only
    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pictures = self.pictures(trainer, pl_module)
        name = f"epoch={trainer.current_epoch:04d}"
        if trainer.val_check_batch is None or trainer.val_check_batch < trainer.num_training_batches:
            # more than one validation an epoch (trainer.val_check_interval < 1, or a time:
            # val_check_batch None): one file each, named by the optimizer steps taken, as the
            # step checkpoints are (the loggers' axis is one below: _logged_step)
            name += f"-step={trainer.global_step}"
        for key, (grid, caption) in pictures.items():
            self._emit(trainer, key, grid, caption, Path(key.split("/")[-1]) / f"{name}.png")

    def _emit(self, trainer: pl.Trainer, key: str, image: torch.Tensor, caption: str, relpath: Path) -> None:
        """One picture to a PNG file under ``save_dir`` and to every W&B logger (rank zero): W&B
        is handed that file (it copies it into the run), so the picture is encoded once."""
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        shown: Any = None
        if self.save_dir is not None:
            path = self.save_dir / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            pics.save_png(image, path)
            shown = str(path)
        elif wandb_loggers:
            shown = pics.to_pil(image)  # (a float tensor: wandb.Image casts [0, 1] to uint8, all black)
        for logger in wandb_loggers:
            logger.log_image(key=key, images=[shown], caption=[caption], step=_logged_step(trainer))

    # --- rate–distortion: one point per validated epoch, drawn when training ends ---------------
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or "val/kl" not in metrics or "val/recon" not in metrics:
            return
        point = (int(trainer.current_epoch), float(metrics["val/kl"]), float(metrics["val/recon"]))
        self.rate_distortion = [p for p in self.rate_distortion if p[0] != point[0]] + [point]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.rate_distortion:
            epochs, kl, recon = zip(*sorted(self.rate_distortion), strict=True)
            image = pics.rate_distortion(list(epochs), list(kl), [-r for r in recon])
            self._emit(trainer, "val/rate_distortion", image,
                       "x: rate val/kl; y: distortion −val/recon; one point per epoch", Path("rate_distortion.png"))
            self._write_csv("rate_distortion.csv", ["epoch", "val/kl", "val/recon"], sorted(self.rate_distortion))

    def _write_csv(self, name: str, header: list[str], rows: list[Any]) -> None:
        if self.save_dir is None:
            return
        self.save_dir.mkdir(parents=True, exist_ok=True)
        with open(self.save_dir / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)

    # --- after testing: pictures of the test split --------------------------------------------
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.test_pictures or not trainer.is_global_zero:
            return
        for key, (image, caption) in self.test_pictures_of(trainer, pl_module).items():
            self._emit(trainer, key, image, caption, Path(f"{key.split('/')[-1]}.png"))
        diag = getattr(pl_module, "test_diagnostics", None) or {}
        if diag.get("kl_per_dim") is not None:
            rows = [[u, kl, var, int(a)] for u, (kl, var, a) in
                    enumerate(zip(diag["kl_per_dim"], diag["variance_of_means"], diag["active"], strict=True))]
            header = ["dim", "kl", "variance_of_mean", "active"]
            self._write_csv("kl_per_dim.csv", header, rows)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_table(key="test/kl_per_dim_table", columns=header, data=rows, step=_logged_step(trainer))

    @torch.no_grad()
    def test_pictures_of(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, tuple[torch.Tensor, str]]:
        vae = pl_module.vae
        dm = trainer.datamodule
        test = getattr(dm, "test_set", None)
        if test is None or len(test) == 0:
            return {}
        was_training = vae.training
        vae.eval()
        out: dict[str, tuple[torch.Tensor, str]] = {}
        try:
            with _seeded(pl_module.device, self.seed):
                picked = spread_examples(len(test), self.max_latent_points, self.seed)
                labels = test.labels[picked.to(test.labels.device)]
                bs = getattr(dm, "eval_batch_size", 256)
                images = test.images[picked.to(test.images.device)]
                xs = [dm.to_float(images[i:i + bs].to(pl_module.device)) for i in range(0, len(picked), bs)]
                means = upcast(torch.cat([posterior_mean(vae.encode(x)) for x in xs]))
                every = torch.cat(xs)
                # spread over the picked examples (themselves in the split's order, which may be
                # by class: binarized MNIST's test file starts with its zeros)
                shown_at = spread_examples(len(every), self.num_images, self.seed)
                first = int(shown_at[0]) if len(shown_at) else 0
                if self.num_images > 0:
                    shown = every[shown_at.to(every.device)]
                    px = vae.reconstruct(shown)
                    if not _finite_pictures(px.mean):
                        return out
                    out["test/reconstructions"] = (
                        pics.grid(torch.cat([shown, px.mean, px.sample()]), nrow=len(shown), min_pixels=self.min_pixels),
                        "top: test inputs x; middle: mean of p(x|z); bottom: a sample x ~ p(x|z); z = mean of q(z|x)")
                diag = getattr(pl_module, "test_diagnostics", None) or {}
                if not diag.get("variance_of_means"):
                    diag = {"mean_of_means": means.mean(0).tolist(), "variance_of_means": means.var(0).tolist()}
                k = min(self.num_traversal_dims, vae.latent_dim)
                if k > 0 and self.traversal_steps > 0:
                    dims = most_active_dims(diag, k)
                    centre = torch.tensor(diag["mean_of_means"], device=means.device)
                    spread = torch.tensor(diag["variance_of_means"], device=means.device).sqrt().clamp_min(1e-3)
                    images = pics.traversals(vae, means[first], dims, centre, spread, steps=self.traversal_steps)
                    out["test/traversals"] = (
                        pics.grid(images, nrow=self.traversal_steps, min_pixels=self.min_pixels),
                        f"rows: latent dims {dims} (most active first), z_u from mean −3 sd to +3 sd over the "
                        "test set; other dims at the mean of q(z|x) of the first image of test/reconstructions; "
                        "mean of p(x|z)")
                pairs = min(self.num_interpolations, len(test) // 2)
                if pairs > 0 and self.interpolation_steps > 0:
                    # pairs drawn at random from the picked examples (neighbours in a split stored
                    # by class would be two images of one class)
                    ends = torch.randperm(len(every), generator=torch.Generator().manual_seed(self.seed + 2))
                    ends = ends[: 2 * pairs].to(every.device)
                    xa, xb = every[ends[0::2]], every[ends[1::2]]
                    images = pics.interpolations(vae, xa, xb, steps=self.interpolation_steps)
                    out["test/interpolations"] = (
                        pics.grid(images, nrow=self.interpolation_steps + 2, min_pixels=self.min_pixels),
                        "each row: x_a, mean of p(x|z) on the line between the means of q(z|x_a) and q(z|x_b), x_b")
                if means.shape[0] >= 2:
                    out["test/latent_space"] = (pics.latent_scatter(means, labels),
                                                "means of q(z|x) of the test set, coloured by class")
                if diag.get("kl_per_dim") is not None:
                    out["test/kl_per_dim"] = (pics.kl_bars(diag["kl_per_dim"], diag["active"]),
                                              "KL(q(z_u|x) ‖ p(z_u)) per latent dimension u, test mean")
        finally:
            vae.train(was_training)
        return out

    @torch.no_grad()
    def pictures(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, tuple[torch.Tensor, str]]:
        vae = pl_module.vae
        was_training = vae.training
        vae.eval()
        out: dict[str, tuple[torch.Tensor, str]] = {}
        try:
            dm = trainer.datamodule
            val = getattr(dm, "val_set", None)
            if val is not None and self.num_images > 0:
                picked = spread_examples(len(val), self.num_images, self.seed)
                with _seeded(pl_module.device, self.seed + 1):
                    # (to_float draws: dynamic binarization, dequantization noise; seeded, so the
                    # same inputs every epoch, and the training's random streams left alone)
                    x = dm.to_float(val.images[picked.to(val.images.device)].to(pl_module.device))
                    px = vae.reconstruct(x)
                    mean = px.mean
                    if not _finite_pictures(mean):
                        return out  # (the module's guard stops the run right after this hook)
                    rows = torch.cat([x, mean, px.sample()])
                out["val/reconstructions"] = (
                    pics.grid(rows, nrow=len(x), min_pixels=self.min_pixels),
                    "top: inputs x; middle: mean of p(x|z); bottom: a sample x ~ p(x|z); z = mean of q(z|x)")
            if self.num_samples > 0:
                with _seeded(pl_module.device, self.seed):
                    samples = vae.sample(self.num_samples).mean
                nrow = max(1, int(self.num_samples**0.5))
                out["val/samples"] = (pics.grid(samples, nrow=nrow, min_pixels=self.min_pixels), "mean of p(x|z), z ~ p(z) (from the same noise every epoch)")
        finally:
            vae.train(was_training)
        return out


def _last_validation(trainer: pl.Trainer) -> bool:
    """Whether the limits leave no later validation: trainer.max_steps is reached, or no later
    epoch of trainer.max_epochs validates (check_val_every_n_epoch). (An early stop or
    trainer.max_time cannot be foreseen.)"""
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    every = trainer.check_val_every_n_epoch or 1
    return trainer.max_epochs not in (None, -1) and trainer.current_epoch + every >= trainer.max_epochs


def _logged_step(trainer: pl.Trainer) -> int:
    """The step on the loggers' axis of the scalars logged now: Lightning logs them at the
    number of optimizer steps taken before this batch's (``_batches_that_stepped``), so an
    epoch-end validation's numbers are at that epoch's last step, one below ``global_step``."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def spread_examples(total: int, n: int, seed: int) -> torch.Tensor:
    """Indices of ``min(n, total)`` examples drawn once with ``seed`` from the whole split, in
    order: the same every epoch, and spread over it (a split stored by class, such as binarized
    MNIST's test file, showed only zeros in its first examples)."""
    if n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


class ProgressBar(TQDMProgressBar):
    """tqdm's live bar on a terminal; one line per epoch when the output is a file or a pipe
    (CI, a cluster job's log), where a live bar would write thousands of partial lines:

        epoch 3/100  train/elbo_epoch -27.61  val/elbo -27.23  val/iwae -26.90  (0.4 s)
    """

    KEYS = ("train/elbo_epoch", "val/elbo", "val/iwae")

    def __init__(self, refresh_rate: int = 10, interactive: bool | None = None):
        # every 10 steps: the bar's numbers change on logging steps only (log_every_n_steps),
        # and each refresh asks Lightning for all its progress-bar metrics
        self.interactive = sys.stdout.isatty() if interactive is None else bool(interactive)
        super().__init__(refresh_rate=refresh_rate if self.interactive else 0)
        self._epoch_started = 0.0
        self._validated_epoch: int | None = None
        if not self.interactive:
            # no bar to move (refresh_rate 0): Lightning's loop skips a hook that is None
            self.on_train_batch_end = None  # type: ignore[assignment,method-assign]

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        elbo = getattr(pl_module, "last_step_values", {}).get("train/elbo")  # logged past self.log
        if elbo is not None:
            items["train/elbo"] = f"{elbo:.3f}"
        return items

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # a run resumed within an epoch gets no on_train_epoch_start for it: its clock starts here
        self._epoch_started = time.time()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.time()
        super().on_train_epoch_start(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.interactive or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        parts = [epoch_label(trainer.current_epoch, trainer.max_epochs)]
        # val/* of this epoch's validation only (callback_metrics keeps an earlier one's where
        # this epoch had none: check_val_every_n_epoch > 1, a stop by max_steps)
        validated = self._validated_epoch == trainer.current_epoch
        parts += [f"{k} {float(metrics[k]):.2f}" for k in self.KEYS
                  if k in metrics and (validated or not k.startswith("val/"))]
        parts.append(f"({time.time() - self._epoch_started:.1f} s)")
        print("  ".join(parts), flush=True)


class ThroughputMonitor(pl.Callback):
    """Training throughput: images per second over each epoch's training batches (its
    validations excluded, those within the epoch too), logged as ``perf/train_images_per_sec``
    at the epoch's end, and the peak resident memory. With ``save_path`` the per-epoch figures
    are also written as JSON after each epoch (a run killed later keeps them) and when training
    ends (the benchmarks in ``benchmarks/`` read them); a resumed run keeps the epochs the file
    holds from before the epoch it resumes in. An epoch resumed within it counts from the
    resume: its images and seconds are those trained and spent in this process."""

    def __init__(self, save_path: str | None = None):
        super().__init__()
        self.save_path = Path(save_path) if save_path else None
        self.epochs: list[dict[str, float]] = []
        self._start: float | None = None  # the clock runs from here (None: stopped, for a validation)
        self._seconds = 0.0
        self._images = 0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_path is not None and self.save_path.is_file() and trainer.is_global_zero:
            try:
                before = json.loads(self.save_path.read_text()).get("epochs", [])
            except (OSError, ValueError, AttributeError):
                before = []  # (unreadable: this run's figures replace it, as before)
            self.epochs = [e for e in before if isinstance(e, dict) and e.get("epoch", math.inf) < trainer.current_epoch]
        # a run resumed within an epoch gets no on_train_epoch_start for it: the clock starts here
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self._start, self._seconds, self._images = time.perf_counter(), 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:  # training goes on after a validation within the epoch
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += int(batch[0].shape[0])

    def _fitting(self, trainer: pl.Trainer) -> bool:
        # (not `trainer.training`: that is False once the validation loop has begun, which made
        # every epoch's figure include its validation)
        return not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fitting(trainer):
            # validation, at the epoch's end or within it, is not training, nor are the checkpoint
            # saves after it: the clock starts again at the next training batch
            self._stop_clock(pl_module)

    def _stop_clock(self, pl_module: pl.LightningModule) -> None:
        if self._start is not None:
            self._sync(pl_module)
            self._seconds += time.perf_counter() - self._start
            self._start = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_clock(pl_module)
        if self._images == 0 or self._seconds <= 0:
            return
        rate = self._images * trainer.world_size / self._seconds
        self.epochs.append({"epoch": trainer.current_epoch, "images": self._images * trainer.world_size,
                            "seconds": self._seconds, "images_per_sec": rate})
        pl_module.log("perf/train_images_per_sec", rate, rank_zero_only=True)
        self._images = 0
        self._write(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_path is None or not trainer.is_global_zero:
            return
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
        out = {"epochs": self.epochs, "peak_rss_mib": peak}
        if pl_module.device.type == "cuda":
            out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        write_json(self.save_path, out)  # (whole or not at all: a kill while writing keeps the last)
