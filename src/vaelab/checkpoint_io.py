"""Writing checkpoints so that no fault loses one that was already written.

``AtomicCheckpointIO`` is the Lightning ``CheckpointIO`` plugin that ``vaelab.cli.train`` gives
the Trainer (config key ``checkpoint_io``). Every save

1. refuses a state holding NaN or Inf (the last good checkpoint stays the last one on disk),
2. serializes into a temporary file in the checkpoint's own folder (same file system, so the
   rename below is atomic), flushes and ``fsync``s it,
3. ``os.replace``s it over the target and ``fsync``s the folder.

A process killed at any moment therefore leaves either the previous ``last.ckpt`` or the new
one, never a half-written file. A full disk (``ENOSPC``), a quota or a read-only folder give a
``CheckpointWriteError`` naming the folder and the fix, and leave no temporary file behind.
Loading goes through ``torch.load(weights_only=True)`` always (also for ``ckpt_path`` resumes).
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

#: errnos that mean "this folder cannot take the file", with the fix to name
_WRITE_FIXES = {
    errno.ENOSPC: "the disk is full: free space there or point the checkpoints at another disk",
    getattr(errno, "EDQUOT", -1): "the disk quota is exceeded: free space or point the checkpoints elsewhere",
    errno.EROFS: "the file system is read-only: choose a writable output folder",
    errno.EACCES: "no permission to write there: choose a writable output folder",
    errno.EPERM: "no permission to write there: choose a writable output folder",
}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the ones already on disk are untouched."""


class NonFiniteStateError(RuntimeError):
    """Refused to save a checkpoint whose weights hold NaN or Inf."""


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict holding NaN or Inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. some network file systems): the rename still happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-to-temp, fsync, rename; see the module docstring."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        bad = nonfinite_tensors(checkpoint.get("state_dict") or {})
        if bad:
            raise NonFiniteStateError(
                f"refusing to write {path}: the weights hold NaN/Inf ({', '.join(bad[:5])}); the "
                "checkpoints already in that folder are the last good ones"
            )
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        folder = path.parent
        tmp = folder / f".{path.name}.tmp-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                self._write(f, data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            fix = _WRITE_FIXES.get(err.errno or 0, "check that the folder exists and is writable")
            raise CheckpointWriteError(
                err.errno or 0,
                f"could not write the checkpoint {path} ({os.strerror(err.errno) if err.errno else err}): "
                f"{fix} (the checkpoint folder is callbacks.model_checkpoint.dirpath={folder}). The "
                f"checkpoints already in {folder} are intact; resume from one with ckpt_path=<it>.",
            ) from err
        finally:
            data.release()
            buffer.close()
        _fsync_dir(folder)

    def _write(self, f: Any, data: memoryview) -> None:
        """Write the serialized bytes (a seam for tests that need a slow save)."""
        f.write(data)

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = True) -> dict[str, Any]:
        # tensors, numbers, strings and containers only: unpickling cannot run code
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
