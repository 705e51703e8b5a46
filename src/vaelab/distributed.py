"""Several processes, one job: what DDP needs from vaelab beyond Lightning's defaults.

* ``DDPStrategy``: Lightning's DDP, but the extra processes it starts on one machine run the
  *job's* Hydra overrides into the *job's* run folder. Lightning's own re-launch repeats
  ``sys.argv``, which inside a sweep is the whole sweep (``-m a=1,2``: every rank would start a
  sweep of its own, with new run folders and W&B runs), and inside a joblib or submitit job is
  not vaelab's command at all. Ranks > 0 write no Hydra files (``hydra.output_subdir=null``,
  console-only logging) and create no W&B run (Lightning's loggers act on rank zero).
* ``job_scope``: a sweep runs its jobs one after another in one process; Lightning leaves the
  process group and ``LOCAL_RANK``/``MASTER_PORT``/... in ``os.environ`` behind, and the next
  job would then believe that another program started its processes, and wait for ever.
* ``RandomStreams``: every rank draws different noise (reparameterization ε, dynamic
  binarization), while the data split (``DistributedSampler``, seeded by ``PL_GLOBAL_SEED``)
  stays shared; a resumed run continues each rank's streams from its checkpoint.
* ``eval_sampler``: validation and test shards without the padding ``DistributedSampler`` adds
  (which would count some examples twice in ``val/elbo`` and ``test/nll``).
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.strategies import DDPStrategy as _LightningDDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset, Sampler

from vaelab.folders import quote_override

#: what Lightning's launcher writes into os.environ of the main process
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED",
              "PL_SEED_WORKERS")

#: Hydra overrides a rank > 0 process must not repeat: the job's own folder and logging are given
_DROP_HYDRA = ("hydra.run.", "hydra.sweep.", "hydra.launcher", "hydra/launcher", "hydra.sweeper",
               "hydra/sweeper", "hydra.mode", "hydra.output_subdir", "hydra.job.", "hydra/job_logging",
               "hydra/hydra_logging", "hydra.job_logging", "hydra.hydra_logging")


def rank_command(local_rank: int) -> tuple[list[str], str, dict[str, str]]:
    """The command, working folder and extra environment of the process for ``local_rank``
    of the current Hydra job: the same entry point (train or eval), the job's overrides (one
    sweep job's values, not the sweep), and its run folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hc = HydraConfig.get()
    entry = "eval_script" if hc.job.config_name == "eval" else "train_script"  # as eval.py / train.py run them
    command = [sys.executable, "-c", f"from vaelab.cli import {entry}; {entry}()"]
    command += [f"--config-name={hc.job.config_name}"]
    command += list(hc.overrides.task)
    command += [o for o in hc.overrides.hydra if not o.lstrip("+~").startswith(_DROP_HYDRA)]
    run_dir = hc.runtime.output_dir
    command += [
        f"hydra.run.dir={quote_override(run_dir)}",
        "hydra.output_subdir=null",            # rank zero wrote .hydra/ already
        f"hydra.job.name={hc.job.name}_rank{local_rank}",
        "hydra/job_logging=stdout",            # no second log file in the run folder
        "hydra/hydra_logging=default",
    ]
    # the package the parent runs, also when it is found through sys.path rather than installed
    package_root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (package_root, path) if p)}
    return command, get_original_cwd(), env


class _JobLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher, starting ranks > 0 with ``rank_command``."""

    def _call_children_scripts(self) -> None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():  # not under Hydra (a notebook, a test): Lightning's way
            return super()._call_children_scripts()
        self._check_can_spawn_children()
        self.procs = []
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        for local_rank in range(1, self.num_processes):
            command, cwd, extra_env = rank_command(local_rank)
            env = {**os.environ, **extra_env, "LOCAL_RANK": str(local_rank)}
            self.procs.append(subprocess.Popen(command, env=env, cwd=cwd))
        return None


class DDPStrategy(_LightningDDPStrategy):
    """``strategy: ddp`` whose extra local processes belong to the current Hydra job."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _JobLauncher(self.cluster_environment, self.num_processes, self.num_nodes)


@contextlib.contextmanager
def job_scope() -> Iterator[None]:
    """Leave the process as the job found it: no process group, no launcher variables."""
    saved = {k: os.environ.get(k) for k in LAUNCH_ENV}
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    try:
        yield
    finally:
        if not had_group and torch.distributed.is_available() and torch.distributed.is_initialized():
            with contextlib.suppress(Exception):
                torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RandomStreams(pl.Callback):
    """Every process's random streams: torch's CPU generator and its CUDA device's, which is all
    that training draws from (reparameterization ε, dynamic binarization, dequantization, the
    epoch's data order).

    * Start: rank r > 0 re-seeds with ``seed + r`` once the process group exists, so that every
      rank draws different noise. The model is built before (the same on every rank, and DDP
      broadcasts rank zero's weights anyway); the data split is not affected (its sampler is
      seeded by PL_GLOBAL_SEED, which is left alone). A single process keeps ``seed`` exactly.
    * Resume: a checkpoint holds every rank's streams as they stood at its save (under DDP
      gathered from all ranks, which all take part in a save), and a run resumed from it sets
      them again just before its first training step, after its sanity check. It then draws
      what the uninterrupted run would have drawn: on one process with deterministic kernels,
      the same numbers. Without this, a resume would seed from ``seed`` again and draw the noise
      of the run's first steps again (and, from an epoch's end, its first epoch's data order).
      A checkpoint without them, or from another number of processes, seeds each rank from
      ``seed``, its rank and the checkpoint's step instead: fresh draws, and a warning.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._trainer: pl.Trainer | None = None
        self._loaded: list[dict[str, torch.Tensor]] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        rank = trainer.global_rank
        if trainer.world_size > 1 and rank > 0:
            seed = (self.seed + rank) % 2**32
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)

    def _cuda_device(self) -> torch.device | None:
        """The training's CUDA device (torch's RNG calls take one without an index as the current one)."""
        device = self._trainer.strategy.root_device if self._trainer is not None else None
        return device if device is not None and device.type == "cuda" else None

    def state_dict(self) -> dict[str, Any]:
        mine = {"cpu": torch.get_rng_state()}
        if (device := self._cuda_device()) is not None:
            mine["cuda"] = torch.cuda.get_rng_state(device)
        ranks = [mine]
        if self._trainer is not None and self._trainer.world_size > 1:
            ranks = [None] * self._trainer.world_size
            torch.distributed.all_gather_object(ranks, mine)
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = list(state_dict.get("ranks") or [])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is None and not trainer.ckpt_path:
            return  # a fresh run: the streams seeded at the start
        rank = trainer.global_rank
        if loaded is not None and len(loaded) == trainer.world_size:
            mine = loaded[rank]
            torch.set_rng_state(mine["cpu"])
            if (device := self._cuda_device()) is not None and "cuda" in mine:
                torch.cuda.set_rng_state(mine["cuda"], device)
            return
        why = ("holds no random streams (saved before vaelab kept them)" if loaded is None else
               f"holds the random streams of {len(loaded)} process{'es' * (len(loaded) != 1)}, this run has "
               f"{trainer.world_size}")
        rank_zero_warn(f"The checkpoint {why}: each process's random streams are seeded from seed={self.seed}, its "
                       f"rank and the step ({trainer.global_step}), so the resumed run draws fresh noise, not what "
                       "the uninterrupted run would have drawn.")
        seed = (self.seed + 1_000_003 * (trainer.global_step + 1) + rank) % 2**32
        torch.manual_seed(seed)


def eval_sampler(dataset: Dataset, split: str = "validation") -> Sampler | None:
    """Under DDP, shards of the validation/test split that together hold every example once
    (ranks may differ by one example); otherwise None (the DataLoader's own order). A split
    with fewer examples than processes is refused, naming the fix (every rank refuses it the
    same way): one rank would have none, which Lightning's sampler met with a bare assertion on
    that rank and the others with a broken connection."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    world = torch.distributed.get_world_size()
    if world < 2:
        return None
    if len(dataset) < world:  # type: ignore[arg-type]
        from vaelab.errors import SettingError

        fix = "data.val_size" if split == "validation" else "a larger test split"
        raise SettingError(f"the {split} split holds {len(dataset)} example{'s' * (len(dataset) != 1)}, fewer than "  # type: ignore[arg-type]
                           f"the {world} processes, each of which evaluates a share of it: give {fix} of at least "
                           f"{world} examples, or run with fewer processes (trainer.devices)")
    return UnrepeatedDistributedSampler(dataset, shuffle=False)

