"""Shared fixtures. Tests never touch the network: W&B is forced offline, data come from
scikit-learn's bundled digits, from data made in the test, or from ../shared/data where it
exists (tests that need it skip cleanly without it)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VAELAB_SHARED_DATA", REPO.parent / "shared" / "data"))

# under pytest-xdist (make test: one test process per core) each process, and every run it
# starts, gets its share of the cores' threads: N processes each using all N cores would thrash
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // _WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Refuse connections to anything but this machine from the test process."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (
            host.startswith("127.") or host in ("localhost", "::1") or self.family == socket.AF_UNIX
        ):
            raise RuntimeError(f"test tried to reach the network: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def shared_copy(name: str, dest: Path) -> Path:
    """A writable copy of ../shared/data/<name> under dest (torchvision writes next to it)."""
    src = SHARED_DATA / name
    if not src.is_dir():
        pytest.skip(f"{src} is not here (the shared real data sets)")
    shutil.copytree(src, dest / name)
    return dest


def run_cli(script: str, *overrides: str, cwd: Path, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python <script> overrides...`` from the repo root as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
    return proc


def snapshot(folder: Path) -> dict[Path, bytes]:
    """Every file under ``folder`` with its bytes: to check that a refused command wrote nothing."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def poisoned_checkpoint(ckpt: Path, dest: Path, group: str = "likelihood", self_allowed: bool = False
                        ) -> tuple[Path, Path]:
    """A copy of a real checkpoint whose stored config names ``os.system`` for ``group``,
    commanded to create a marker file: the marker's absence proves that nothing ran.
    ``self_allowed``: ``shutil.copyfile`` instead (which Hydra itself does not block), with the
    stored config's own ``allowed_targets=[shutil.]``. Returns (bad checkpoint, marker)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    marker = dest / "pwned"
    config = state["hyper_parameters"]["config"]
    if self_allowed:
        config[group] = {"_target_": "shutil.copyfile", "_args_": [str(ckpt), str(marker)]}
        config["allowed_targets"] = ["shutil."]
    else:
        config[group] = {"_target_": "os.system", "command": f"touch {marker}"}
    bad = dest / ("self-allowed.ckpt" if self_allowed else "bad.ckpt")
    torch.save(state, bad)
    return bad, marker
