"""What logging step values costs a training step, paired inside one training run.

    python benchmarks/logging_cost.py                       # MLP, intervals 50 and 10, 2 runs
    python benchmarks/logging_cost.py --intervals 50,10,1000 --epochs 8

Each logged point reaches W&B through its worker thread, W&B's asyncio thread and its
``wandb-core`` process: about 0.3 ms of CPU a point on an idle machine, more beside a
training step that holds both cores of this project's machine. throughput.py cannot resolve
a 2 % difference between separate processes on that machine (its runs of one contender
spread by ±5 %). Here one ``train.py`` run, as users run it (W&B offline, checkpoints,
pictures), carries a callback that switches ``trainer.log_every_n_steps`` between the given
intervals every ``--block`` training steps; each interval's median ms a step over its blocks
is compared with the first interval's, block by block (the ratio of neighbouring blocks, so a
drift of the host's speed cancels). Validation is excluded, as in throughput.py, and so is
the first block after each validation (cold caches; otherwise whichever interval always came
first after it would pay for them). W&B's background work started in one block may finish in
the next: blocks of many steps keep that spill small. ``--intervals 50,51`` is the null check:
two settings that cost the same should give 1.00 (the session that wrote this got 0.999, 1.002).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
from paired import TrainingBlocks
from throughput import prepare_root, run_vaelab_with_callback


class AlternateLogInterval(TrainingBlocks):
    """Sets ``trainer.log_every_n_steps`` to each of ``intervals`` in turn for ``block`` steps
    (blocks as paired.py times them: the first after each validation not counted); the seconds
    a step of each block, by interval, written to ``save_path`` at the end."""

    def __init__(self, intervals: list[int], save_path: str, block: int = 65):
        super().__init__(block)
        self.intervals, self.save_path = [int(i) for i in intervals], Path(save_path)
        self.blocks: list[tuple[int, float]] = []  # (interval, s/step), in the order run
        self._turn = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.log_every_n_steps = self.intervals[0]

    def on_block(self, trainer: pl.Trainer, pl_module: pl.LightningModule, seconds_per_step: float) -> None:
        self.blocks.append((trainer.log_every_n_steps, seconds_per_step))
        self._turn += 1
        trainer.log_every_n_steps = self.intervals[self._turn % len(self.intervals)]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.save_path.write_text(json.dumps(self.blocks))


def ratios(blocks: list[tuple[int, float]], intervals: list[int]) -> dict[int, float]:
    """Median over rounds (consecutive recorded blocks, one of each interval) of each
    interval's block time over the first interval's block time in the same round."""
    n = len(intervals)
    rounds = [dict(blocks[i : i + n]) for i in range(0, len(blocks) - n + 1, n)]
    rounds = [r for r in rounds if len(r) == n]
    return {iv: statistics.median(r[iv] / r[intervals[0]] for r in rounds) for iv in intervals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "conv"], default="mlp")
    parser.add_argument("--intervals", default="50,10", help="log_every_n_steps values, the first the reference")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--block", type=int, default=65, help="steps per block")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    intervals = [int(i) for i in args.intervals.split(",")]

    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = prepare_root(tmp)
        for run in range(args.runs):
            save = tmp / f"blocks{run}.json"
            print(f"run {run + 1} of {args.runs} ...", file=sys.stderr, flush=True)
            run_vaelab_with_callback(args.model, args.epochs, args.device, root, tmp / f"run{run}",
                                     "logging_cost.AlternateLogInterval",
                                     {"intervals": f"[{','.join(map(str, intervals))}]", "save_path": save,
                                      "block": args.block})
            blocks = [(int(iv), s) for iv, s in json.loads(save.read_text())]
            medians = {iv: statistics.median(s for i, s in blocks if i == iv) for iv in intervals}
            results.append((len(blocks) // len(intervals), medians, ratios(blocks, intervals)))

    ref = intervals[0]
    print(f"\n{args.model}, log_every_n_steps alternating every {args.block} steps inside each train.py run; "
          f"ratio: ms a step over the same round's log_every_n_steps={ref} block (median over rounds)\n")
    print("| run | rounds | " + " | ".join(f"every {iv}: ms/step (ratio)" for iv in intervals) + " |")
    print("|---|---:|" + "---:|" * len(intervals))
    for i, (rounds, medians, ratio) in enumerate(results, 1):
        cells = " | ".join(f"{1e3 * medians[iv]:.3f} ({ratio[iv]:.3f})" for iv in intervals)
        print(f"| {i} | {rounds} | {cells} |")
    for iv in intervals[1:]:
        print(f"\nlog_every_n_steps={iv} against {ref}: {statistics.median(r[2][iv] for r in results):.3f} "
              "of the time a step (median over runs)")


if __name__ == "__main__":
    main()
