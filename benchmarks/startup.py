"""What a `python train.py` process costs besides its work: the time to its last line of output,
and the time from that line until the process has ended (the interpreter's teardown, which
vaelab skips: vaelab.exits; VAELAB_FAST_EXIT=0 keeps it).

    python benchmarks/startup.py                 # 3 interleaved rounds
    python benchmarks/startup.py --rounds 5

Three kinds of command, each with the fast exit on and off, alternating within each round:
  trained   one epoch on the default data set (digits) with W&B offline and the test pass,
            as `python train.py trainer.max_epochs=1` runs it
  refused   a bad value (latent_dim=0): refused before anything is built, and before torch
            and Lightning are imported (vaelab.cli)
  help      `python train.py --help`
The process is timed from outside (a pipe, as a test or a job scheduler reads it), so
"ended" is when the process has exited and its output pipe is closed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: kind → (arguments, the exit status it must end with)
KINDS = {
    "trained": (["trainer.max_epochs=1"], 0),
    "refused": (["latent_dim=0"], 1),
    "help": (["--help"], 0),
}


def timed_run(overrides: list[str], out: Path, fast: bool) -> tuple[int, float, float]:
    """(exit status, seconds to the last output line, seconds to the end of the process)."""
    env = {**os.environ, "VAELAB_FAST_EXIT": "1" if fast else "0", "WANDB_SILENT": "true"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *overrides, f"paths.output_dir={out}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last_line = start
    assert proc.stdout is not None
    for _ in proc.stdout:  # until the pipe closes: every process holding it has ended
        last_line = time.perf_counter()
    status = proc.wait()
    return status, last_line - start, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    results: dict[tuple[str, bool], list[tuple[float, float]]] = {(k, f): [] for k in KINDS for f in (True, False)}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for kind, (overrides, expected) in KINDS.items():
                for fast in (True, False) if r % 2 == 0 else (False, True):
                    out = Path(tmp) / f"{kind}-{r}-{int(fast)}"
                    status, line, end = timed_run(overrides, out, fast)
                    if status != expected:
                        sys.exit(f"{kind} run (fast exit {'on' if fast else 'off'}) exited {status}, not {expected}")
                    results[kind, fast].append((line, end))
                    print(f"round {r + 1}/{args.rounds}: {kind:8s} fast exit {'on ' if fast else 'off'}  "
                          f"last line {line:6.2f} s, ended {end:6.2f} s", file=sys.stderr, flush=True)

    print(f"\npython {sys.version.split()[0]}, {os.cpu_count()} cores; medians of {args.rounds} interleaved rounds\n")
    print("| run | fast exit | to the last line (s) | to the end (s) | after the last line (s) |")
    print("|---|---|---:|---:|---:|")
    for (kind, fast), runs in results.items():
        line = statistics.median(r[0] for r in runs)
        end = statistics.median(r[1] for r in runs)
        after = statistics.median(r[1] - r[0] for r in runs)
        print(f"| {kind} | {'on' if fast else 'off'} | {line:.2f} | {end:.2f} | {after:.2f} |")
    for kind in KINDS:
        saved = statistics.median(b[1] - b[0] for b in results[kind, False]) - \
            statistics.median(a[1] - a[0] for a in results[kind, True])
        print(f"\n{kind}: the fast exit saves {saved:.2f} s a process", end="")
    print()


if __name__ == "__main__":
    main()
