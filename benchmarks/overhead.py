"""Framework overhead per training step, in milliseconds, split into where it is paid.

    python benchmarks/overhead.py                  # 3 interleaved rounds, one thread
    python benchmarks/overhead.py --rounds 5

throughput.py answers "how fast does vaelab train compared with a plain loop"; on a shared
machine its ratios move by several per cent from run to run, more than any one change to the
per-step work. This script answers "what does vaelab add to every step, and where": it trains
a tiny VAE (784-8-2, batch 128, binarized MNIST) on one thread, so that a step's arithmetic is
small and what is left is the per-step work of the loop, and runs the contenders in one
process, interleaved, taking each one's median over rounds:

  plain        a hand-written loop: index_select, the ELBO written out, fused Adam
  lightning    Lightning's loop around that same hand-written step (bare Trainer, the same
               DataModule): Lightning's hooks, closure and batch handling
  vaelab-core  vaelab's VAEModule in that bare Trainer: torch.distributions, the objective,
               the epoch metrics and the NaN guard
  vaelab       vaelab.jobs.train as users run it: W&B offline, checkpoints, pictures, progress

The differences between consecutive rows are the costs of each layer. Validation is excluded
from every figure (as in throughput.py). The per-step figures are repeatable to a few per cent
on this project's 2-core machine, where throughput ratios are not: use this to see whether a
change to the per-step path helped, and throughput.py for what a user gets.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from throughput import (  # the same loop and data
    BATCH,
    plain_lightning_module,
    plain_model,
    plain_step,
    prepare_root,
)

HIDDEN = [8]
LATENT = 2


def _config(root: Path, out: Path, *extra: str):
    from hydra import compose, initialize_config_module

    from vaelab.jobs import resolve_data_options

    overrides = [f"latent_dim={LATENT}", f"data.batch_size={BATCH}", "data=binarized_mnist", f"data.root={root}",
                 f"encoder.hidden={HIDDEN}", f"decoder.hidden={HIDDEN}", "likelihood=bernoulli",
                 f"paths.data_dir={root}", f"paths.output_dir={out}", "test=false", "trainer.accelerator=cpu",
                 *extra]
    with initialize_config_module(config_module="vaelab.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    resolve_data_options(cfg)
    return cfg


def _networks(shape):
    """throughput.py's plain encoder, decoder and fused Adam, shrunk to 784-8-2."""
    return plain_model("mlp", shape, "cpu", hidden=HIDDEN, latent=LATENT)


def _datamodule(cfg):
    from omegaconf import OmegaConf

    from vaelab.jobs import build_datamodule

    config = OmegaConf.to_container(cfg, resolve=True)
    return build_datamodule(cfg.data, config), config


def run_plain(root: Path, out: Path, epochs: int) -> list[float]:
    dm, _ = _datamodule(_config(root, out))
    dm.setup("fit")
    x_all = dm.to_float(dm.train_set.images).contiguous()
    enc, dec, opt = _networks(tuple(x_all.shape[1:]))
    times, n = [], len(x_all)
    for _ in range(epochs):
        perm = torch.randperm(n)
        start = time.perf_counter()
        for i in range(0, n, BATCH):
            plain_step("mlp", enc, dec, opt, x_all.index_select(0, perm[i : i + BATCH]))
        times.append((time.perf_counter() - start) / -(-n // BATCH))
    return times


def _bare_fit(module, dm, epochs: int) -> list[float]:
    import lightning.pytorch as pl

    from vaelab.callbacks import ThroughputMonitor

    monitor = ThroughputMonitor()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, callbacks=[monitor],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    return [BATCH / e["images_per_sec"] for e in monitor.epochs]


def run_lightning(root: Path, out: Path, epochs: int) -> list[float]:
    dm, _ = _datamodule(_config(root, out))
    dm.setup("fit")
    return _bare_fit(plain_lightning_module("mlp", *_networks(dm.data_shape)), dm, epochs)


def run_vaelab_core(root: Path, out: Path, epochs: int) -> list[float]:
    from vaelab.module import VAEModule

    dm, config = _datamodule(_config(root, out))
    return _bare_fit(VAEModule(config=config, data_info=dm.info), dm, epochs)


def run_vaelab(root: Path, out: Path, epochs: int) -> list[float]:
    from vaelab.jobs import train

    shutil.rmtree(out, ignore_errors=True)
    train(_config(root, out, f"trainer.max_epochs={epochs}"))
    epochs_run = json.loads((out / "throughput.json").read_text())["epochs"]
    return [BATCH / e["images_per_sec"] for e in epochs_run]


CONTENDERS = {"plain": run_plain, "lightning": run_lightning, "vaelab-core": run_vaelab_core, "vaelab": run_vaelab}


def main() -> None:
    global HIDDEN, LATENT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per contender")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", default=",".join(map(str, HIDDEN)),
                        help="the MLP's hidden widths (512,512 with --latent 32: throughput.py's MLP)")
    parser.add_argument("--latent", type=int, default=LATENT)
    args = parser.parse_args()
    HIDDEN, LATENT = [int(h) for h in args.hidden.split(",")], args.latent
    torch.set_num_threads(args.threads)
    # importing Lightning makes every Adam step of a CPU-only machine probe for NVML; vaelab
    # turns that off (vaelab.build.skip_failing_nvml_probe). Off for every contender here, so
    # that the rows differ by their loops alone
    import lightning.pytorch  # noqa: F401 - sets PYTORCH_NVML_BASED_CUDA_CHECK=1, which the next line undoes

    from vaelab.build import keep_freed_memory, skip_failing_nvml_probe

    skip_failing_nvml_probe()
    keep_freed_memory()  # train.py's allocator setting (malloc=tuned), for every contender from the start
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("lightning", "lightning.pytorch", "vaelab"):
        logging.getLogger(name).setLevel(logging.ERROR)

    names = list(CONTENDERS)
    per_step: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = prepare_root(tmp)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                print(f"round {r + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                times = CONTENDERS[name](root, tmp / "out", args.epochs)
                per_step[name] += times[1:]  # the first epoch warms up

    medians = {n: 1e3 * statistics.median(v) for n, v in per_step.items()}
    print(f"\ntorch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cores, "
          f"MLP 784-{'-'.join(map(str, HIDDEN))}-{LATENT}, batch {BATCH}; {args.rounds} interleaved rounds, median of "
          f"{args.epochs - 1} epoch(s) each\n")
    print("| contender | ms/step (median) | range | added by this layer |")
    print("|---|---:|---:|---:|")
    previous = None
    for n in names:
        v = [1e3 * t for t in per_step[n]]
        added = "" if previous is None else f"{medians[n] - medians[previous]:+.3f}"
        print(f"| {n} | {medians[n]:.3f} | {min(v):.3f}–{max(v):.3f} | {added} |")
        previous = n
    print(f"\nvaelab's overhead over the plain loop: {medians['vaelab'] - medians['plain']:.3f} ms a step")


if __name__ == "__main__":
    main()
