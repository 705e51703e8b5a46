"""What an epoch's end costs besides the training steps: validation, pictures, checkpoint saves
and the wait for their writes, per epoch, on the default job (digits, 20 steps an epoch),
where they are a large share of the time.

    python benchmarks/epoch_end.py                          # this tree, 3 rounds of 30 epochs
    python benchmarks/epoch_end.py --baseline 8730cf5       # ... and that commit, alternating
    python benchmarks/epoch_end.py --epochs 50 --rounds 5 --overrides callbacks.images.every_n_epochs=10

Each run is `python train.py` as users run it (W&B offline, checkpoints in the background,
pictures every epoch; no test split), with one more callback that times, per epoch:

  train        the epoch's training steps (first step's start to last step's end)
  validation   the validation loop, pictures excluded
  pictures     ImageLogger's pictures of the epoch (on_validation_epoch_end)
  saves        the checkpoint callbacks' saves (their on_train_epoch_end / on_validation_end)
  wait         the wait for the background checkpoint writes when the next epoch starts
               (commits before the nineteenth session's; since then training does not wait)
  epoch end    all of it: the last step's end to the next epoch's first step

and, after the run, the checkpoint folder's size (files sharing their bytes counted once).
The first epoch is left out (warm-up). ``--baseline REV`` runs the same job from a git worktree
of REV (its own ``src/``, this environment), alternating with this tree in every round, so the
two are compared on the same host within seconds: the ratios are what to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]
PARTS = ("train", "validation", "pictures", "saves", "wait", "epoch end")


class EpochEndTimer(pl.Callback):
    """Times each epoch's parts (module docstring) by wrapping the other callbacks' epoch hooks;
    writes the per-epoch seconds to ``save_path`` when training ends."""

    def __init__(self, save_path: str):
        self.save_path = save_path
        self.epochs: list[dict[str, float]] = []
        self._current: dict[str, float] = {}
        self._first_step: float | None = None
        self._last_step_end: float | None = None
        self._validation_start: float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning.pytorch.callbacks import Checkpoint

        for callback in trainer.callbacks:
            name = type(callback).__name__
            if name == "ImageLogger":
                self._wrap(callback, "on_validation_epoch_end", "pictures")
            elif name == "EpochCheckpointsWritten":  # (a baseline from before the nineteenth session)
                self._wrap(callback, "on_train_epoch_start", "wait")
            elif isinstance(callback, Checkpoint):
                self._wrap(callback, "on_train_epoch_end", "saves")
                self._wrap(callback, "on_validation_end", "saves")

    def _wrap(self, callback: Any, hook: str, part: str) -> None:
        method = getattr(callback, hook, None)
        if not callable(method):
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._current[part] = self._current.get(part, 0.0) + time.perf_counter() - start

        setattr(callback, hook, timed)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if batch_idx == 0:
            if self._last_step_end is not None:  # the epoch before ends here
                self._current["epoch end"] = now - self._last_step_end
                self.epochs.append(self._current)
            self._current, self._first_step = {}, now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_step_end = time.perf_counter()
        if self._first_step is not None:
            self._current["train"] = self._last_step_end - self._first_step

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validation_start is not None and not trainer.sanity_checking:
            self._current["validation"] = time.perf_counter() - self._validation_start
        self._validation_start = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_step_end is not None:  # the last epoch: its end up to here
            self._current["epoch end"] = time.perf_counter() - self._last_step_end
            self.epochs.append(self._current)
        for epoch in self.epochs:  # the pictures are drawn inside the validation loop
            epoch["validation"] = epoch.get("validation", 0.0) - epoch.get("pictures", 0.0)
        Path(self.save_path).write_text(json.dumps(self.epochs))


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``, each file's bytes once (hard links share them)."""
    seen: dict[tuple[int, int], int] = {}
    for path in folder.rglob("*"):
        if path.is_file():
            stat = path.stat()
            seen[(stat.st_dev, stat.st_ino)] = stat.st_size
    return sum(seen.values())


def run_once(tree: Path, epochs: int, out: Path, overrides: list[str]) -> dict[str, Any]:
    save = out.parent / f"{out.name}.json"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONPATH": os.pathsep.join([str(tree / "src"), str(Path(__file__).parent)])}
    cmd = [sys.executable, str(tree / "train.py"), f"trainer.max_epochs={epochs}", "test=false",
           f"hydra.run.dir={out}", "+callbacks.bench._target_=epoch_end.EpochEndTimer",
           f"+callbacks.bench.save_path={save}", "allowed_targets=[epoch_end.]", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"the run in {tree} failed:\n{proc.stderr[-3000:]}")
    per_epoch = json.loads(save.read_text())[1:]  # the first epoch is warm-up
    medians = {part: 1e3 * statistics.median(e.get(part, 0.0) for e in per_epoch) for part in PARTS}
    return {"ms": medians, "wall_s": wall, "checkpoint_mib": folder_bytes(out / "checkpoints") / 2**20}


def commit_of(rev: str) -> str:
    """``rev`` (HEAD~1, a branch, a tag, a hash) as its short commit hash: the name of its
    worktree and its runs' folders, which Hydra's overrides take (``~`` and ``/`` they do not)."""
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", f"{rev}^{{commit}}"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"--baseline {rev}: not a git revision of {REPO} ({proc.stderr.strip()})")
    return proc.stdout.strip()


def worktree(rev: str, where: Path) -> Path:
    path = where / f"baseline-{rev}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(path), rev],
                   check=True, capture_output=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", help="a git revision to run alternately with this tree")
    parser.add_argument("--overrides", nargs="*", default=[], help="more train.py overrides, for both")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trees = {"this tree": REPO}
        if args.baseline:
            args.baseline = commit_of(args.baseline)
            trees[args.baseline] = worktree(args.baseline, tmp)
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        try:
            for r in range(args.rounds):
                order = list(trees.items()) if r % 2 == 0 else list(reversed(trees.items()))
                for name, tree in order:
                    out = tmp / f"{name.replace(' ', '-')}-{r}"
                    results[name].append(run_once(tree, args.epochs, out, args.overrides))
                    print(f"round {r + 1}: {name:>10}  epoch end {results[name][-1]['ms']['epoch end']:.1f} ms",
                          file=sys.stderr)
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(trees[args.baseline])],
                               capture_output=True)

    print(f"\n{args.epochs} epochs of the default job (digits, batch 64, 20 steps an epoch), "
          f"{args.rounds} rounds; ms per epoch: median over epochs 2-{args.epochs}, then over rounds "
          f"(range over rounds){' ' + ' '.join(args.overrides) if args.overrides else ''}\n")
    names = list(trees)
    header = "| part | " + " | ".join(names) + (f" | {names[0]} / {names[1]} |" if len(names) > 1 else " |")
    print(header)
    print("|---" * (len(header.split("|")) - 2) + "|")

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"

    rows = [(part, {n: [res["ms"][part] for res in results[n]] for n in names}) for part in PARTS]
    rows.append(("wall time (s)", {n: [res["wall_s"] for res in results[n]] for n in names}))
    rows.append(("checkpoints (MiB)", {n: [res["checkpoint_mib"] for res in results[n]] for n in names}))
    for label, values in rows:
        line = f"| {label} | " + " | ".join(cell(values[n]) for n in names)
        if len(names) > 1:
            # paired by round: the same host within seconds
            ratios = [a / b for a, b in zip(values[names[0]], values[names[1]], strict=True) if b > 0]
            line += f" | {statistics.median(ratios):.3f} |" if ratios else " | |"
        else:
            line += " |"
        print(line)


if __name__ == "__main__":
    main()
