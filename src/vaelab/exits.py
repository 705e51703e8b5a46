"""Ending a ``python train.py`` / ``eval.py`` process without Python's interpreter teardown.

When a script returns, CPython joins the process's non-daemon threads, runs the ``atexit``
handlers, and then tears the interpreter down: it clears every module and frees every object,
one by one, and the C++ libraries run their static destructors. After a run of ``train.py``
that last part, which writes nothing, takes 2.5-2.9 s on this project's 2-core CPU machine
(``benchmarks/startup.py``; 1 s after ``import torch`` alone): a pause after the run's summary
is printed, paid by every run, every DDP rank, every refused command and every test that
starts ``train.py``.

``exit_when_done(main)`` runs ``main`` and then does what CPython does before the teardown,
in CPython's order: waits for the non-daemon threads (a checkpoint still being written; with
the callbacks ``concurrent.futures`` registers to stop its idle workers), runs the ``atexit``
handlers (``logging.shutdown`` closes Hydra's log file, W&B ends its service,
``weakref.finalize`` callbacks such as temporary folders' run), flushes every file object still
open for writing (which the teardown would have flushed when freeing it), and then ends the
process with ``os._exit`` and the same exit status, as ``multiprocessing`` ends every forked
child (``threading._shutdown``, its own exit handlers, the standard streams flushed,
``os._exit``). ``VAELAB_FAST_EXIT=0`` keeps Python's own teardown (for tools
that report at teardown, such as ``-X dev``'s unclosed-resource warnings).

Only a ``main`` that returns or raises ``SystemExit`` (Hydra's way of ending with an error:
it prints the error and exits with status 1) ends this way; any other exception propagates,
with Python's own ending, as before.

Two differences remain. Open files are flushed, not closed: a compressed stream that its owner
left unclosed gets no trailer (nor is it promised one by the teardown, whose order of freeing
is not fixed). A standard output whose reader has gone (``python train.py | head``) ends the
process with its status, where CPython's failed final flush would make it 120.
"""

from __future__ import annotations

import atexit
import gc
import io
import itertools
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

#: set to 0 (or false, no, off) for Python's own interpreter teardown at the end of a run
ENV = "VAELAB_FAST_EXIT"


#: the file objects that hold written bytes in a buffer of their own (FileIO writes through)
_BUFFERED_WRITERS = (io.TextIOWrapper, io.BufferedWriter, io.BufferedRandom, io.BufferedRWPair)


def fast_exit_enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def exit_status(code: Any) -> int:
    """The process's exit status for ``sys.exit(code)``, as CPython computes it: None is 0, an
    integer itself, anything else is printed to stderr and gives 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _flush_open_files() -> None:
    """Flush every buffered file object still open for writing: the teardown would have
    flushed each one when freeing it, so nothing a library left unclosed is lost."""
    objects = gc.get_objects()
    # by type, in C: isinstance would ask each of ~500k objects for its __class__ (some lazy
    # module proxies answer with a deprecation warning), and the io.IOBase ABC's subclass test
    # takes ~0.4 ms per type; the buffered writers are concrete types (subclasses included)
    buffered = {t for t in set(map(type, objects)) if issubclass(t, _BUFFERED_WRITERS)}
    for stream in itertools.compress(objects, map(buffered.__contains__, map(type, objects))):
        try:
            if not stream.closed and stream.writable():
                stream.flush()
        except Exception:  # noqa: BLE001, S112 - a broken stream: the teardown would ignore it too
            continue
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001, S112 - e.g. a closed pipe
            continue


def exit_when_done(main: Callable[[], Any]) -> None:
    """Run ``main``; when it returns or raises ``SystemExit``, end the process with that exit
    status without the interpreter's teardown (see the module docstring). Returns only where
    the fast exit is off (``VAELAB_FAST_EXIT=0``, or a Python without the two steps below),
    after ``main`` returned; a ``SystemExit`` then propagates."""
    # CPython's own first steps at the end of a process: threading._shutdown runs the callbacks
    # registered with threading._register_atexit (concurrent.futures tells its idle workers to
    # stop there: joining the threads without them would wait forever) and waits for every
    # non-daemon thread; then the atexit handlers
    shutdown_threads = getattr(threading, "_shutdown", None)
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if not fast_exit_enabled() or shutdown_threads is None or run_exitfuncs is None:
        main()
        return
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = exit_status(stop.code)
    shutdown_threads()
    run_exitfuncs()
    _flush_open_files()
    os._exit(code)
