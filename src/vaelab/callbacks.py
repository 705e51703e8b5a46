"""Lightning callbacks: pictures of what the model does, each validation epoch.

* ``val/reconstructions``: a fixed set of validation inputs (top row) above the mean of
  p(x|z) at z = the mean of q(z|x) (bottom row).
* ``val/samples``: the mean of p(x|z) for z ~ p(z), with the same z every epoch, so the grid
  shows the model changing rather than the noise.

Each picture goes to every logger that takes images (W&B) and to a PNG file under
``save_dir``, on the rank-zero process only.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image


def _upscale(images: torch.Tensor, min_size: int) -> torch.Tensor:
    """Nearest-neighbour upscaling so that 8×8 digits are visible in a dashboard."""
    factor = max(1, -(-min_size // images.shape[-1]))
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def _displayable(images: torch.Tensor) -> torch.Tensor:
    return images.float().clamp(0.0, 1.0).cpu()


class ImageLogger(pl.Callback):
    def __init__(
        self,
        save_dir: str | None = None,
        num_images: int = 16,
        num_samples: int = 64,
        every_n_epochs: int = 1,
        min_pixels: int = 32,
        seed: int = 0,
    ):
        super().__init__()
        self.save_dir = Path(save_dir) if save_dir else None
        self.num_images = int(num_images)
        self.num_samples = int(num_samples)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.min_pixels = int(min_pixels)
        self.seed = int(seed)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._log(trainer, pl_module)

    @rank_zero_only
    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pictures = self.pictures(trainer, pl_module)
        for key, (grid, caption) in pictures.items():
            if self.save_dir is not None:
                path = self.save_dir / key.split("/")[-1] / f"epoch={trainer.current_epoch:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_image(grid, path)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=key, images=[grid], caption=[caption], step=trainer.global_step)

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
                x = dm.to_float(val.images[: self.num_images].to(pl_module.device))
                recon = vae.reconstruct(x).mean
                both = _upscale(_displayable(torch.cat([x, recon])), self.min_pixels)
                grid = make_grid(both, nrow=len(x), padding=2, pad_value=0.5)
                out["val/reconstructions"] = (grid, "top: inputs x; bottom: mean of p(x|z), z = mean of q(z|x)")
            if self.num_samples > 0:
                with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
                    torch.manual_seed(self.seed)
                    samples = vae.sample(self.num_samples).mean
                nrow = max(1, int(self.num_samples**0.5))
                grid = make_grid(_upscale(_displayable(samples), self.min_pixels), nrow=nrow, padding=2, pad_value=0.5)
                out["val/samples"] = (grid, "mean of p(x|z), z ~ p(z) (the same z every epoch)")
        finally:
            vae.train(was_training)
        return out


class ProgressBar(TQDMProgressBar):
    """tqdm's live bar on a terminal; one line per epoch when the output is a file or a pipe
    (CI, a cluster job's log), where a live bar would write thousands of partial lines:

        epoch 3/100  train/elbo_epoch -27.61  val/elbo -27.23  val/iwae -26.90  (0.4 s)
    """

    KEYS = ("train/elbo_epoch", "val/elbo", "val/iwae")

    def __init__(self, refresh_rate: int = 1, interactive: bool | None = None):
        self.interactive = sys.stdout.isatty() if interactive is None else bool(interactive)
        super().__init__(refresh_rate=refresh_rate if self.interactive else 0)
        self._epoch_started = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started = time.time()
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.interactive or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        parts += [f"{k} {float(metrics[k]):.2f}" for k in self.KEYS if k in metrics]
        parts.append(f"({time.time() - self._epoch_started:.1f} s)")
        print("  ".join(parts), flush=True)


class ThroughputMonitor(pl.Callback):
    """Training throughput: images per second over each epoch's training batches (validation
    excluded), logged as ``perf/train_images_per_sec``, and the peak resident memory. With
    ``save_path`` the per-epoch figures are also written as JSON when training ends (the
    benchmarks in ``benchmarks/`` read them)."""

    def __init__(self, save_path: str | None = None):
        super().__init__()
        self.save_path = Path(save_path) if save_path else None
        self.epochs: list[dict[str, float]] = []
        self._start = 0.0
        self._images = 0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self._start, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += int(batch[0].shape[0])

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # validation runs before on_train_epoch_end: stop the clock here
        if not trainer.sanity_checking and trainer.training:
            self._record(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module)  # epochs without validation

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._images == 0:
            return
        self._sync(pl_module)
        seconds = time.perf_counter() - self._start
        rate = self._images * trainer.world_size / seconds
        self.epochs.append({"epoch": trainer.current_epoch, "images": self._images * trainer.world_size,
                            "seconds": seconds, "images_per_sec": rate})
        pl_module.log("perf/train_images_per_sec", rate, rank_zero_only=True)
        self._images = 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_path is not None and trainer.is_global_zero:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
            out = {"epochs": self.epochs, "peak_rss_mib": peak}
            if pl_module.device.type == "cuda":
                out["peak_cuda_mib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
            self.save_path.parent.mkdir(parents=True, exist_ok=True)
            self.save_path.write_text(json.dumps(out, indent=2))
