"""vaelab.exits: train.py and eval.py end without the interpreter's teardown, and lose nothing.

Each case runs a small script in its own Python process (vaelab.exits imports nothing heavy),
with the same steps as ``train_script``: ``exit_when_done(main)``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vaelab.exits import exit_status

SCRIPT = """
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from vaelab.exits import exit_when_done

out = Path(sys.argv[1])

class TornDown:
    # freed only by the interpreter's teardown (a module global): writes when that runs
    def __del__(self):
        (out / "teardown").write_text("ran")

KEPT = TornDown()

def main():
    global LOG, POOL
    LOG = open(out / "unclosed.txt", "w")  # buffered, never closed or flushed by its owner
    LOG.write("every line written\\n" * 1000)  # more than a buffer: written through at once
    LOG.write("the last line")  # a small write: held in the file object's buffer
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    def late_writer():
        time.sleep(0.5)
        (out / "thread").write_text("finished")
    threading.Thread(target=late_writer).start()  # a non-daemon thread still working
    POOL = ThreadPoolExecutor(1)  # kept, never shut down: its worker waits for work until told to stop
    POOL.submit(lambda: (time.sleep(0.3), (out / "pool").write_text("finished")))
    print("from main", end="")  # stdout without a newline: still in its buffer
    {ending}

exit_when_done(main)
print("not reached when the fast exit is on")
"""


def _run(tmp_path: Path, ending: str, fast: str | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT).replace("{ending}", ending))
    # stdout a buffered pipe, as for a test or a job scheduler's log (not PYTHONUNBUFFERED)
    env = {k: v for k, v in os.environ.items() if k not in ("VAELAB_FAST_EXIT", "PYTHONUNBUFFERED")}
    if fast is not None:
        env["VAELAB_FAST_EXIT"] = fast
    return subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize(("ending", "status"), [("return None", 0), ("sys.exit(3)", 3), ("sys.exit(None)", 0)])
def test_a_fast_exit_keeps_the_status_threads_atexit_handlers_and_buffered_writes(tmp_path, ending, status):
    proc = _run(tmp_path, ending)
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == "from main"  # flushed, and nothing after exit_when_done ran
    assert (tmp_path / "unclosed.txt").read_text().endswith("the last line")  # the whole buffer
    assert (tmp_path / "thread").read_text() == "finished"  # waited for, as Python does
    assert (tmp_path / "pool").read_text() == "finished"  # and the executor's worker stopped
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "teardown").exists()  # the teardown itself was skipped: the time saved


def test_a_message_given_to_sys_exit_is_printed_with_status_1(tmp_path):
    proc = _run(tmp_path, "sys.exit('the config has 1 problem')")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "the config has 1 problem"
    assert (tmp_path / "unclosed.txt").read_text().endswith("the last line")
    assert not (tmp_path / "teardown").exists()


def test_other_exceptions_end_the_ordinary_way(tmp_path):
    proc = _run(tmp_path, "raise KeyError('boom')")
    assert proc.returncode == 1
    assert "KeyError: 'boom'" in proc.stderr  # Python's own traceback
    assert (tmp_path / "teardown").read_text() == "ran"
    assert (tmp_path / "unclosed.txt").read_text().endswith("the last line")


@pytest.mark.parametrize("setting", ["0", "off"])
def test_the_fast_exit_can_be_turned_off(tmp_path, setting):
    proc = _run(tmp_path, "return None", fast=setting)
    assert proc.returncode == 0
    assert proc.stdout == "from mainnot reached when the fast exit is on\n"  # exit_when_done returned
    assert (tmp_path / "teardown").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "finished"


def test_exit_status_follows_python():
    assert exit_status(None) == 0
    assert exit_status(0) == 0
    assert exit_status(2) == 2
    assert exit_status(True) == 1  # bool is an int: sys.exit(True) exits 1
