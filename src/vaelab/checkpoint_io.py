"""Writing checkpoints so that no fault loses one that was already written.

``AtomicCheckpointIO`` is the Lightning ``CheckpointIO`` plugin that ``vaelab.jobs.train`` gives
the Trainer (config key ``checkpoint_io``). Every save

1. refuses a state holding NaN or Inf (the last good checkpoint stays the last one on disk),
2. serializes into a temporary file in the checkpoint's own folder (same file system, so the
   rename below is atomic), flushes and ``fsync``s it,
3. ``os.replace``s it over the target and ``fsync``s the folder.

A process killed at any moment therefore leaves either the previous ``last.ckpt`` or the new
one, never a half-written file. A full disk (``ENOSPC``), a quota or a read-only folder give a
``CheckpointWriteError`` naming the folder and the fix, and leave no temporary file behind.
Loading goes through ``torch.load(weights_only=True)`` always (also for ``ckpt_path`` resumes).

Writing in the background (``background=true``, the default): step 1 and the serialization
run in the caller, so the bytes are the state at the moment of the save and a NaN state is
refused at once; the file operations of 2 and 3 (write, fsync, rename: on this project's
machine 10-12 ms of the ~17 ms of a 16 MiB checkpoint, on a network file system far more) run
in one writer thread while training goes on, in the order they were asked for (the W&B
logger's ``vaelab.loggers.OrderedWorker``). Removals of
older checkpoints (Lightning's top-k, ``vaelab.runs.LatestCheckpoint``) go through the same
queue, so an old file is removed only after the file that replaces it is on disk; after a
failed write nothing queued behind it runs. A failure is raised by the next save or removal,
by ``wait()`` and at the end of training (Lightning's ``teardown``), as the same
``CheckpointWriteError``. Training does not wait for the writes of an epoch's end: the next
epoch starts while they go on (a write is mostly a wait for the disk: on this project's 2-core
machine 59 ms for 16 MiB, of which 13 ms of CPU; waiting for it at the next epoch's start cost
that whole time, letting it run beside the next steps slowed them by ~10-25 ms).
Serialized bytes waiting to be written are bounded
(``max_pending_mib``): a save waits for earlier writes rather than hold more than that in
memory, so a checkpoint larger than the bound is serialized only once the one before it is
written, never two in memory at once, as with the synchronous save. ``background=false``
writes in the caller, as before.

Checkpoints of one moment are written once: where several files hold the training state of
the same moment (at an epoch's end the best checkpoint, ``last.ckpt`` and the latest-state
checkpoint, ``vaelab.runs``), the first is serialized and written, and the others become
second names of it (``link_checkpoint``: a hard link, put in place by the same rename; a copy
where the file system has no hard links), in the same queue after its write.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vaelab.errors import ExplainedError
from vaelab.loggers import OrderedWorker

log = logging.getLogger("vaelab")

#: errnos that mean "this folder cannot take the file", with the fix to name
_WRITE_FIXES = {
    errno.ENOSPC: "the disk is full: free space there or point the checkpoints at another disk",
    getattr(errno, "EDQUOT", -1): "the disk quota is exceeded: free space or point the checkpoints elsewhere",
    errno.EROFS: "the file system is read-only: choose a writable output folder",
    errno.EACCES: "no permission to write there: choose a writable output folder",
    errno.EPERM: "no permission to write there: choose a writable output folder",
}


class CheckpointWriteError(OSError, ExplainedError):
    """A checkpoint could not be written; the ones already on disk are untouched."""


class NonFiniteStateError(RuntimeError, ExplainedError):
    """Refused to save a checkpoint whose weights hold NaN or Inf."""


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict holding NaN or Inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def write_error(err: OSError, path: Path) -> CheckpointWriteError:
    """The ``CheckpointWriteError`` for a failed write of the checkpoint ``path``, with the fix."""
    folder = path.parent
    fix = _WRITE_FIXES.get(err.errno or 0, "check that the folder exists and is writable")
    return CheckpointWriteError(
        err.errno or 0,
        f"could not write the checkpoint {path} ({os.strerror(err.errno) if err.errno else err}): "
        f"{fix} (the checkpoint folder is callbacks.model_checkpoint.dirpath={folder}). The "
        f"checkpoints already in {folder} are intact; resume from one with ckpt_path=<it>.",
    )


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


@contextlib.contextmanager
def _put_in_place(path: Path) -> Iterator[Path]:
    """A temporary name in ``path``'s folder (made if missing) for the body to write; renamed
    over ``path`` when the body ends, and the folder fsync'd. A failure removes the temporary
    file and is raised as the ``CheckpointWriteError`` naming the fix; ``path`` is untouched."""
    folder = path.parent
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        _discard(tmp)
        raise write_error(err, path) from err
    _fsync_dir(folder)


def link_file(source: Path, path: Path) -> None:
    """Make ``path`` a second name of the checkpoint file ``source``: a hard link (no bytes
    written), or a copy where the file system has no hard links; put in place of ``path`` by
    a rename, as a write is, so that a kill leaves the old ``path`` or the new one. Nothing to
    do where ``path`` is already that file. A failure is a ``CheckpointWriteError``."""
    source, path = Path(source), Path(path)
    try:
        if path.exists() and os.path.samefile(source, path):
            return
    except OSError as err:
        raise write_error(err, path) from err
    with _put_in_place(path) as tmp:
        _discard(tmp)  # (one a killed process left: a link does not replace it)
        try:
            os.link(source, tmp)
        except OSError as err:
            if not source.is_file() or err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
                raise
            # another file system (the two callbacks' folders apart), or one without hard links
            # (some network and FUSE ones): a copy
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 2**20)
                dst.flush()
                os.fsync(dst.fileno())


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
    """``TorchCheckpointIO`` with write-to-temp, fsync, rename, the file operations in a writer
    thread unless ``background=False``; see the module docstring."""

    def __init__(self, background: bool = True, max_pending_mib: float = 256.0):
        super().__init__()
        if background not in (True, False):
            raise ValueError(f"checkpoint_io.background must be true or false, got {background!r}")
        if not float(max_pending_mib) >= 0:
            raise ValueError(f"checkpoint_io.max_pending_mib must be >= 0, got {max_pending_mib}")
        self.background = bool(background)
        self.max_pending_bytes = int(float(max_pending_mib) * 2**20)
        self._start_queue()

    def _start_queue(self) -> None:
        self._worker = OrderedWorker("vaelab-checkpoint")  # one writer thread, calls in order
        self._lock = threading.Lock()
        self._pending_bytes = 0  # serialized bytes not yet written
        self._last_size = 0  # size of the latest checkpoint: what the next one will need
        self._broken = False  # a job failed: skip the ones queued behind it until it is raised

    @property
    def _jobs(self) -> int:
        """Writes and removals queued or running."""
        return self._worker.unfinished()

    # a plugin object may be copied to other processes (DDP spawn): threads and locks stay here
    def __getstate__(self) -> dict[str, Any]:
        self._worker.join()
        keep = ("_worker", "_lock", "_pending_bytes", "_last_size", "_broken")
        return {k: v for k, v in self.__dict__.items() if k not in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start_queue()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        self._raising(self._worker.raise_failures)  # a write that failed in the background stops training here
        path = Path(path)
        bad = nonfinite_tensors(checkpoint.get("state_dict") or {})
        if bad:
            raise NonFiniteStateError(
                f"refusing to write {path}: the weights hold NaN/Inf ({', '.join(bad[:5])}); the "
                "checkpoints already in that folder are the last good ones"
            )
        if not self.background:
            self._write_file(self._serialize(checkpoint), path)
            return
        if self._pending_bytes and self._pending_bytes + self._last_size > self.max_pending_bytes:
            self._worker.join()  # bound the bytes in memory: wait for the earlier writes
        buffer = self._serialize(checkpoint)  # here, so the bytes are the state of this moment
        size = buffer.getbuffer().nbytes
        self._last_size = size
        self._submit(lambda: self._write_file(buffer, path), size)

    def remove_checkpoint(self, path: Any) -> None:
        """Remove ``path`` once every write asked for before has been done (at once when
        writing in the caller); not at all if one of them failed."""
        self.after_writes(lambda: super(AtomicCheckpointIO, self).remove_checkpoint(path))

    def link_checkpoint(self, source: Any, path: Any) -> None:
        """Make ``path`` a second name of the checkpoint file ``source`` (``link_file``: a hard
        link, no bytes written again) once every write asked for before is done, ``source``'s
        among them; not if one of them failed. At once when writing in the caller."""
        self.after_writes(lambda: link_file(Path(source), Path(path)))

    def after_writes(self, job: Callable[[], None]) -> None:
        """Run ``job`` (e.g. removing files that a new checkpoint replaces) once every write
        asked for before has been done, and not if one of them failed; at once when writing
        in the caller."""
        if self.background:
            self._submit(job)
        else:
            job()

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = True) -> dict[str, Any]:
        self._worker.join()  # a file still being written is read whole (a failure stays for the next save)
        # tensors, numbers, strings and containers only: unpickling cannot run code
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    def wait(self) -> None:
        """Block until every write and removal asked for so far is done; raise the first
        failure among them (a ``CheckpointWriteError``)."""
        self._raising(self._worker.wait)

    def teardown(self) -> None:
        """End of a fit/validate/test: finish the queue and stop the writer thread. A failed
        write is raised here, except while Lightning is already handling another error (a NaN
        stop, an interrupt): that one is raised and this one is logged."""
        handling = sys.exc_info()[1] is not None
        try:
            self.wait()
        except Exception as err:
            if not handling:
                raise
            log.error("vaelab: a checkpoint write also failed: %s", err)
        finally:
            self._worker.close()  # (what a failure left queued has run, skipped, by now)

    # --- the queue -----------------------------------------------------------------------------
    def _submit(self, job: Callable[[], None], size: int = 0) -> None:
        def run() -> None:
            try:
                if not self._broken:  # nothing after a failed job: no removal of the old file
                    job()
            except BaseException:
                self._broken = True
                raise  # kept by the worker, raised on the training thread
            finally:
                with self._lock:
                    self._pending_bytes -= size

        with self._lock:
            self._pending_bytes += size
        try:
            self._raising(lambda: self._worker.submit(run))  # raises a failure before it, if any
        except BaseException:
            with self._lock:
                self._pending_bytes -= size  # not queued
            raise

    def _raising(self, call: Callable[[], None]) -> None:
        """``call`` a method of the worker that raises a failed job, once. Every job queued
        behind that one is skipped (``_broken``: no removal of the file it was to replace), up
        to the moment the failure is raised."""
        try:
            call()
        except BaseException:
            self._worker.join()
            self._broken = False
            raise

    # --- one file --------------------------------------------------------------------------------
    @staticmethod
    def _serialize(checkpoint: dict[str, Any]) -> io.BytesIO:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        return buffer

    def _write_file(self, buffer: io.BytesIO, path: Path) -> None:
        data = buffer.getbuffer()
        try:
            with _put_in_place(path) as tmp, open(tmp, "wb") as f:
                self._write(f, data)
                f.flush()
                os.fsync(f.fileno())
        finally:
            data.release()
            buffer.close()

    def _write(self, f: Any, data: memoryview) -> None:
        """Write the serialized bytes (a seam for tests that need a slow save)."""
        f.write(data)
