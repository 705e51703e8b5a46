"""vaelab against the plain loop, paired inside one training run: the steadiest ratio on a
shared machine.

    python benchmarks/paired.py                     # the MLP model, 2 runs
    python benchmarks/paired.py --model conv --runs 1 --block 10

throughput.py runs each contender in its own process, minutes apart; on this project's shared
2-core machine the speed of the host drifts by more than the differences it measures (the same
command gave vaelab/plain from 0.76 to 0.84). Here one ``train.py`` run, as users run it
(W&B offline, checkpoints, pictures), carries a callback that after every ``--block`` vaelab
training steps runs ``--block`` steps of throughput.py's plain loop (same model, same data, same
kernels: ``throughput.plain_step``) in the same process. Both see the same host, threads and
memory state within seconds of each other. The ratio is the plain loop's median ms a block-step
over vaelab's; blocks that a checkpoint save falls into count for vaelab as they do for users
(the median keeps a rare slow block from deciding). Validation is excluded, and so is the
vaelab block right after each one, whose caches the validation left cold (before, that block
always fell to vaelab).

Each run is followed by the same measurement around Lightning's own loop (``--no-floor`` skips
it): a bare ``pl.Trainer`` (no logger, checkpoints, progress bar or validation; Lightning's
defaults) training a LightningModule whose ``training_step`` returns the plain loop's loss, on
vaelab's data module, with the same plain blocks in between. Its ratio is the floor that
Lightning's automatic-optimization loop sets for any module run inside it; vaelab's ratio
over it is what vaelab's module, callbacks and logging cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from throughput import (
    BATCH,
    REPO,
    load_data,
    plain_model,
    plain_step,
    prepare_root,
    run_vaelab_with_callback,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainingBlocks(pl.Callback):
    """Times a run's training steps in blocks of ``block`` steps and hands each block's seconds
    a step to :meth:`on_block`, whose own time the next block does not count. Validation is
    excluded (a block never spans one), and so is the first block after each validation, which
    is run but not counted: the validation leaves its caches cold, and whatever that block is
    compared with would otherwise always win (paired.py, logging_cost.py)."""

    def __init__(self, block: int):
        self.block = int(block)
        self._start: float | None = None
        self._steps = 0
        self._warm = True

    def on_block(self, trainer: pl.Trainer, pl_module: pl.LightningModule, seconds_per_step: float) -> None:
        raise NotImplementedError

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start, self._steps = time.perf_counter(), 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._warm = None, True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._steps += 1
        if self._start is None or self._steps < self.block:
            return
        if not self._warm:
            _sync(pl_module.device)
            self.on_block(trainer, pl_module, (time.perf_counter() - self._start) / self.block)
        self._warm = False
        self._start, self._steps = time.perf_counter(), 0


class PlainBlocks(TrainingBlocks):
    """After every ``block`` vaelab training steps, ``block`` steps of the plain loop; the
    per-step times of both, written to ``save_path`` when training ends."""

    def __init__(self, model: str, data_root: str, save_path: str, block: int = 40):
        super().__init__(block)
        self.model, self.data_root, self.save_path = model, Path(data_root), Path(save_path)
        self.vaelab: list[float] = []
        self.plain: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        x_all, shape = load_data(self.model, self.data_root)
        self.x = x_all.to(pl_module.device)
        self.nets = plain_model(self.model, tuple(shape.tolist()), str(pl_module.device))
        self.perm, self.pos = torch.randperm(len(self.x), device=self.x.device), 0

    def on_block(self, trainer: pl.Trainer, pl_module: pl.LightningModule, seconds_per_step: float) -> None:
        self.vaelab.append(seconds_per_step)
        start = time.perf_counter()
        with torch.enable_grad():
            for _ in range(self.block):
                if self.pos + BATCH > len(self.x):
                    self.perm, self.pos = torch.randperm(len(self.x), device=self.x.device), 0
                plain_step(self.model, *self.nets, self.x.index_select(0, self.perm[self.pos : self.pos + BATCH]))
                self.pos += BATCH
        _sync(self.x.device)
        self.plain.append((time.perf_counter() - start) / self.block)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.save_path.write_text(json.dumps({"vaelab_s": self.vaelab, "plain_s": self.plain}))


def run_floor(model: str, data_root: str, save_path: str, block: int, epochs: int, device: str) -> None:
    """The bare Lightning loop around the plain step, with plain blocks in between (child)."""
    from throughput import plain_lightning_module

    from vaelab.build import keep_freed_memory, skip_failing_nvml_probe
    from vaelab.datamodules import MNIST, BinarizedMNIST

    skip_failing_nvml_probe()  # as train.py does: no failed NVML probe in each Adam step
    keep_freed_memory()  # and its allocator setting (malloc=tuned)
    if model == "mlp":
        dm = BinarizedMNIST(root=data_root, download=False, batch_size=BATCH)
    else:
        dm = MNIST(root=data_root, download=True, binarize="none", pad=2, val_size=10_000, batch_size=BATCH)
    blocks = PlainBlocks(model, data_root, save_path, block)
    dm.prepare_data()
    dm.setup("fit")
    trainer = pl.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_epochs=epochs,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[blocks])
    trainer.fit(plain_lightning_module(model, *plain_model(model, dm.data_shape, device)), datamodule=dm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "conv"], default="mlp")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--block", type=int, default=40, help="steps of each contender in turn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare-Lightning measurement")
    parser.add_argument("--floor-child", nargs=2, metavar=("DATA_ROOT", "SAVE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_child:
        run_floor(args.model, *args.floor_child, args.block, args.epochs, args.device)
        return

    rows, floors = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = prepare_root(tmp)
        for run in range(args.runs):
            out = tmp / f"run{run}"
            save = tmp / f"blocks{run}.json"
            print(f"run {run + 1} of {args.runs} ...", file=sys.stderr, flush=True)
            run_vaelab_with_callback(args.model, args.epochs, args.device, root, out, "paired.PlainBlocks",
                                     {"model": args.model, "data_root": root, "save_path": save, "block": args.block})
            blocks = json.loads(save.read_text())
            v, p = statistics.median(blocks["vaelab_s"]), statistics.median(blocks["plain_s"])
            rows.append((len(blocks["vaelab_s"]), v, p))
            if not args.no_floor:
                print(f"run {run + 1} of {args.runs}: Lightning's loop around the plain step ...", file=sys.stderr, flush=True)
                floor_save = tmp / f"floor{run}.json"
                proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--epochs", str(args.epochs),
                                       "--block", str(args.block), "--device", args.device,
                                       "--floor-child", str(root), str(floor_save)],
                                      cwd=REPO, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"the bare Lightning run failed:\n{proc.stderr[-3000:]}")
                blocks = json.loads(floor_save.read_text())
                floors.append((len(blocks["vaelab_s"]), statistics.median(blocks["vaelab_s"]),
                               statistics.median(blocks["plain_s"])))

    print(f"\n{args.model}, batch {BATCH}, torch {torch.__version__}, {torch.get_num_threads()} threads, device "
          f"{args.device}; blocks of {args.block} steps, each contender in turn\n")
    print("| run | blocks | vaelab ms/step | plain ms/step | vaelab / plain |")
    print("|---|---:|---:|---:|---:|")
    for i, (n, v, p) in enumerate(rows, 1):
        print(f"| {i} | {n} | {1e3 * v:.3f} | {1e3 * p:.3f} | {p / v:.3f} |")
    print(f"\n{args.model}: vaelab / plain = {statistics.median(p / v for _, v, p in rows):.3f} (median over runs)")
    if floors:
        print("\nLightning's own loop (bare Trainer, Lightning's defaults) around the plain step, the same blocks:\n")
        print("| run | blocks | Lightning + plain step ms/step | plain ms/step | Lightning / plain |")
        print("|---|---:|---:|---:|---:|")
        for i, (n, v, p) in enumerate(floors, 1):
            print(f"| {i} | {n} | {1e3 * v:.3f} | {1e3 * p:.3f} | {p / v:.3f} |")
        floor = statistics.median(p / v for _, v, p in floors)
        ours = statistics.median(p / v for _, v, p in rows)
        print(f"\n{args.model}: Lightning's loop alone = {floor:.3f} of the plain loop; vaelab / that floor = "
              f"{ours / floor:.3f}")


if __name__ == "__main__":
    main()
