"""What Lightning's per-step loop costs around the plain step, and how much of it running k
optimizer steps inside one Lightning step would take back (Keras' ``steps_per_execution``).

    python benchmarks/amortize.py                  # the MLP VAE, 4 interleaved rounds
    python benchmarks/amortize.py --k 2 4 8 --rounds 3

vaelab does not do this (one Lightning step is one optimizer step, so every callback, hook
and counter means what Lightning's documentation says); this script measures what the option
would be worth before anyone builds it. In one process, interleaved, each contender's median
ms per optimizer step over epochs 2-3 of each round:

  plain        throughput.py's hand-written loop (index_select, the ELBO written out, fused Adam)
  automatic    a bare Trainer around that step, automatic optimization (paired.py's floor)
  manual-1     the same with manual optimization (``manual_backward``, ``opt.step()``)
  manual-k     the loader yields k batches at once; ``training_step`` takes k optimizer steps

No logger, checkpoints, progress bar or validation: the differences are Lightning's loop alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from throughput import (
    BATCH,
    load_data,
    plain_lightning_module,
    plain_model,
    plain_step,
    prepare_root,
)

STEPS = 120  # optimizer steps an epoch (a multiple of every k up to 8 times BATCH)


class _Loader:
    """``k`` batches at a time, as one tensor, from a fresh permutation each epoch."""

    def __init__(self, x: torch.Tensor, k: int):
        self.x, self.k = x, k

    def __iter__(self):
        perm = torch.randperm(STEPS * BATCH)
        for i in range(0, STEPS * BATCH, BATCH * self.k):
            yield (self.x.index_select(0, perm[i : i + BATCH * self.k]),)

    def __len__(self) -> int:
        return STEPS // self.k


def _fit(module: pl.LightningModule, x: torch.Tensor, k: int) -> float:
    """Median seconds per optimizer step over epochs 2-3 (vaelab's ThroughputMonitor, as in
    overhead.py)."""
    from vaelab.callbacks import ThroughputMonitor

    monitor = ThroughputMonitor()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor])
    trainer.fit(module, train_dataloaders=_Loader(x, k))
    return statistics.median(BATCH / e["images_per_sec"] for e in monitor.epochs[1:])


def _plain(x: torch.Tensor, shape: tuple[int, ...]) -> float:
    enc, dec, opt = plain_model("mlp", shape, "cpu")
    times = []
    for _ in range(3):
        perm = torch.randperm(STEPS * BATCH)
        start = time.perf_counter()
        for i in range(0, STEPS * BATCH, BATCH):
            plain_step("mlp", enc, dec, opt, x.index_select(0, perm[i : i + BATCH]))
        times.append((time.perf_counter() - start) / STEPS)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--k", type=int, nargs="+", default=[4], help="optimizer steps per Lightning step")
    args = parser.parse_args()
    if any(STEPS % k for k in args.k):
        sys.exit(f"--k must divide {STEPS}")
    from vaelab.build import keep_freed_memory, skip_failing_nvml_probe

    skip_failing_nvml_probe()  # as train.py: no failed NVML probe in each Adam step
    keep_freed_memory()
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        x, shape = load_data("mlp", prepare_root(Path(tmp)))
    x, shape = x[: STEPS * BATCH].contiguous(), tuple(shape.tolist())

    def module(manual: bool) -> pl.LightningModule:
        return plain_lightning_module("mlp", *plain_model("mlp", shape, "cpu"), manual=manual)

    names = ["plain", "automatic", "manual-1", *[f"manual-{k}" for k in args.k if k != 1]]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
        for name in names if r % 2 == 0 else names[::-1]:
            if name == "plain":
                times[name].append(_plain(x, shape))
            elif name == "automatic":
                times[name].append(_fit(module(manual=False), x, 1))
            else:
                k = int(name.split("-")[1])
                times[name].append(_fit(module(manual=True), x, k))
    plain = statistics.median(times["plain"])
    print(f"\nMLP 784-512-512-32, batch {BATCH}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.rounds} interleaved rounds, median ms per optimizer step\n")
    print("| contender | ms/step | range | plain / this |")
    print("|---|---:|---:|---:|")
    for name in names:
        v = [1e3 * t for t in times[name]]
        med = statistics.median(times[name])
        print(f"| {name} | {1e3 * med:.3f} | {min(v):.3f}-{max(v):.3f} | {plain / med:.3f} |")


if __name__ == "__main__":
    main()
