"""Loading checkpoints safely and rebuilding their models without the original command line.

A checkpoint is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only, so unpickling cannot run code. Its stored config is checked against the
allowed ``_target_`` prefixes (``vaelab.build``) before anything is instantiated from it.
"""

from __future__ import annotations

import pickle
import re
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vaelab.build import (
    ALLOWED_TARGETS_ENV,
    NOT_FOUND,
    OUTSIDE,
    UnsafeConfigError,
    allowed_prefixes,
    iter_targets,
    target_problem,
)
from vaelab.errors import ExplainedError
from vaelab.options import under_prefix
from vaelab.validation import allowed_targets_of


class CheckpointError(RuntimeError, ExplainedError):
    """The file given as a checkpoint cannot be used: missing, truncated or not vaelab's."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder (then its ``checkpoints/last.ckpt``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if candidate.is_file():
                return candidate
        # a run killed in its first epoch has only its step checkpoint: the furthest one
        steps = [(int(m.group(1)), f) for f in (p / "checkpoints").glob("latest-step*.ckpt")
                 if (m := re.match(r"latest-step(\d+)", f.name))]
        if steps:
            return max(steps)[1]
        found = sorted(p.rglob("*.ckpt"))
        if found and (sweep := sweep_hint(p)):
            raise CheckpointError(sweep)
        if not found:
            raise CheckpointError(f"{p} holds no checkpoint (.ckpt) at all: give a run folder (a training run "
                                  "writes <run folder>/checkpoints/last.ckpt and best-*.ckpt) or such a file")
        raise CheckpointError(f"{p} is a folder without checkpoints/last.ckpt: give the .ckpt file itself. "
                              f"It holds: {', '.join(str(f) for f in found[:5])}.")
    if not p.is_file():
        raise CheckpointError(
            f"no checkpoint at {p}: a training run writes them to <run folder>/checkpoints/ "
            "(last.ckpt and best-*.ckpt); give one of those, or the run folder"
        )
    return p


def sweep_hint(folder: Path) -> str | None:
    """What to give instead of a folder that holds run folders (a sweep's: ``0/``, ``1/``, ...,
    each with ``checkpoints/``), naming its runs; None for any other folder."""
    from vaelab.report import run_order

    runs = sorted((d for d in folder.iterdir() if d.is_dir() and (d / "checkpoints").is_dir()),
                  key=lambda d: run_order(d, folder))
    if not runs:
        return None
    listed = ",".join(str(d) for d in runs)
    lines = [f"{folder} holds {len(runs)} run folder{'s' if len(runs) > 1 else ''} ({', '.join(d.name for d in runs[:8])}"
             f"{', ...' if len(runs) > 8 else ''}), not one run's checkpoints: give one run's folder, e.g. "
             f"ckpt_path={runs[0]}", f"  evaluate each: python eval.py -m ckpt_path={listed}"]
    try:  # the sweep's own command, from the multirun.yaml Hydra writes into its folder
        import yaml

        task = yaml.safe_load((folder / "multirun.yaml").read_text())["hydra"]["overrides"]["task"]
        overrides = " ".join(str(o) for o in task if not str(o).startswith("ckpt_path="))
        lines.append(f"  continue the sweep: python train.py -m hydra.sweep.dir={folder} ckpt_path=last {overrides}".rstrip())
    except (OSError, TypeError, KeyError, ValueError):  # (yaml's errors are ValueErrors) not a sweep's folder
        pass
    return "\n".join(lines)


def other_copies(damaged: list[Path], candidates: list[Path]) -> tuple[list[Path], list[Path]]:
    """Of ``candidates`` (checkpoint files of a run), (those that are other files than every
    ``damaged`` one, those that are one of them under another name). An epoch's best checkpoint,
    ``last.ckpt`` and ``latest-step<N>.ckpt`` are often hard links to one file (``vaelab.runs``):
    damaged alike, so naming them as the way out would send a user in a circle."""
    others, same = [], []
    for q in candidates:
        if q in damaged:
            continue
        try:
            alias = any(q.exists() and d.exists() and q.samefile(d) for d in damaged)
        except OSError:
            alias = False
        (same if alias else others).append(q)
    return others, same


def _what_else(p: Path) -> str:
    """Where to turn when the checkpoint ``p`` cannot be used: its run's other files, if any."""
    others, same = other_copies([p], sorted(p.parent.glob("*.ckpt")))
    cut = [q for q in others if not archive_opens(q)]  # (damaged too: not named as the way out)
    others = [q for q in others if q not in cut]
    text = (f"use another checkpoint of the run: {', '.join(q.name for q in others[:4])}" if others else
            "its folder holds no other checkpoint file that can be read: start afresh, or use a copy of the run "
            "made before")
    if cut:
        text += f" ({', '.join(q.name for q in cut[:4])} cannot be read either)"
    if same:
        text += (f" ({', '.join(q.name for q in same)} {'is' if len(same) == 1 else 'are'} this same file "
                 "under another name, a hard link: damaged alike)")
    return text


def archive_opens(q: Path) -> bool:
    """Whether ``q``'s zip directory (at its end) can be read: a file cut short cannot. Cheap: it
    reads no weights (their checksums are ``_damaged_member``'s, at a load)."""
    try:
        if not zipfile.is_zipfile(q):  # a zip archive cut short (its directory is at the end), or
            with open(q, "rb") as f:  # torch's legacy format (a pickle): nothing to read cheaply
                return f.read(2)[:1] == b"\x80"
        with zipfile.ZipFile(q) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def _not_a_checkpoint(p: Path) -> str | None:
    """What ``p`` is where its first bytes are those of no file torch.save writes (a zip archive,
    or the legacy format's pickle), else None: then it is a checkpoint cut short or damaged."""
    try:
        with open(p, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if not head or head.startswith(b"PK") or head[:1] == b"\x80":
        return None
    return "a text file" if b"\0" not in head else "another kind of file"


def _instead(p: Path) -> str:
    """What to give as ``ckpt_path`` instead of ``p``, which is no vaelab checkpoint."""
    run = next((d for d in p.absolute().parents[:3] if (d / "checkpoints").is_dir()), None)  # (images/samples/x.png)
    if run is not None:
        return (f"Give the run folder, ckpt_path={run} (train.py: its latest state; eval.py: the checkpoint its "
                f"summary.json was tested on), or a file of {run / 'checkpoints'}.")
    return ("Give a run folder or one of its checkpoints: a training run writes <run folder>/checkpoints/last.ckpt "
            "and best-*.ckpt.")


def _first_words(err: BaseException, width: int = 300) -> str:
    """The first line of an error's message, cut at a word (torch's are long) rather than in one;
    a word longer than the cut itself (a long path) is cut where the width ends."""
    first = (str(err).splitlines() or [""])[0]
    if len(first) <= width:
        return first
    cut = first[: width - 2]
    space = cut.rfind(" ")
    return (cut[:space] if space > width // 2 else cut) + " …"


def load_checkpoint(path: str | Path, allowed_targets: Sequence[str] = ()) -> dict[str, Any]:
    """Read a vaelab checkpoint onto the CPU, refusing anything that is not one, and one whose
    stored config names a ``_target_`` outside vaelab, torch and Lightning
    (``ALLOWED_TARGET_PREFIXES``), ``$VAELAB_ALLOWED_TARGETS`` and ``allowed_targets``: the
    current command's. The stored config's own ``allowed_targets`` do not count (a file could
    otherwise allow whatever it names); its ``allowed_targets`` are set to the command's."""
    if isinstance(allowed_targets, str):  # (read letter by letter, "mylab." would allow all under "m")
        raise TypeError(f"allowed_targets must be a list of module prefixes, got the string {allowed_targets!r}")
    p = resolve_checkpoint(path)
    try:
        # memory-mapped: validating or reading the config does not read every weight into memory
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        kind = _not_a_checkpoint(p)
        if kind:  # (summary.json, a config, an image, ... given as ckpt_path)
            raise CheckpointError(f"{p} is not a checkpoint: it is {kind}, where torch.save writes a zip archive. "
                                  f"{_instead(p)}") from err
        raise CheckpointError(
            f"{p} cannot be read as a checkpoint ({type(err).__name__}: {_first_words(err)}). "
            f"It may be truncated (a copy or a save that was cut off) or not a PyTorch file; {_what_else(p)}."
        ) from err
    damaged = _damaged_member(p)
    if damaged:
        raise CheckpointError(
            f"{p} is damaged: its part {damaged!r} does not match the checksum written with it (the file "
            f"was changed after it was saved: a failing disk, or a copy that went wrong); {_what_else(p)}."
        )
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "config" not in hp or "data_info" not in hp or "state_dict" not in ckpt:
        raise CheckpointError(f"{p} is a PyTorch file but not a vaelab checkpoint (no config or weights in it). "
                              f"{_instead(p)}")
    _check_stored_targets(p, hp["config"], tuple(allowed_targets))
    hp["config"]["allowed_targets"] = list(allowed_targets)  # what this command allows, not the file
    return ckpt


def _check_stored_targets(p: Path, config: dict[str, Any], allowed_targets: tuple[str, ...]) -> None:
    """``UnsafeConfigError`` naming what to allow where ``config`` (a checkpoint's) names a target
    outside the prefixes this command allows."""
    allowed = allowed_prefixes({"allowed_targets": allowed_targets})
    bad = [(where, t, why) for where, t in iter_targets(config) if (why := target_problem(t, allowed))]
    if not bad:
        return
    stored = allowed_targets_of(config)
    listing = ", ".join(f"{where}: {t}: {why}" for where, t, why in bad[:5])
    text = f"{p} names code outside vaelab, torch and Lightning ({listing}); nothing has been built from it. "
    if [a for a in stored if a not in allowed]:
        text += f"A checkpoint cannot allow its own code: its stored allowed_targets={stored} do not count. "
    tops = {t.split(".")[0] for _, t, _ in bad}
    if all(why.startswith(NOT_FOUND) for _, _, why in bad):
        raise UnsafeConfigError(text + "Its plugins' module is not importable here: install it, or put its folder "
                                       "on PYTHONPATH.")
    if any(why != OUTSIDE and not why.startswith(NOT_FOUND) for _, _, why in bad):  # allowed text, other code
        raise UnsafeConfigError(text + "It reaches code that no model part is by way of an allowed module's name: "
                                       "do not load this file, and ask where it came from.")
    if tops & (set(sys.stdlib_module_names) | {"builtins"}):
        raise UnsafeConfigError(text + "It names Python's own modules, which no model part needs: do not load this "
                                       "file, and ask where it came from.")
    # the prefix to allow: the one the run was trained with, else each target's top module
    needed = ",".join(sorted({next((a for a in stored if under_prefix(t, a)), t.split(".")[0] + ".") for _, t, _ in bad}))
    raise UnsafeConfigError(text + f"If it is a run of your own plugins and you trust the file, allow them in this "
                                   f"command: allowed_targets=[{needed}] (or export {ALLOWED_TARGETS_ENV}={needed}).")


def _damaged_member(path: Path) -> str | None:
    """The first part of a (zip-format) PyTorch file whose bytes fail their CRC-32, else None.
    ``torch.load`` does not check them, so a flipped byte inside a weight loads as a wrong
    number; reading the file once more costs ~1 s per GB."""
    if not zipfile.is_zipfile(path):
        return None  # torch's legacy format carries no checksums
    with zipfile.ZipFile(path) as archive:
        try:
            return archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:  # a damaged header of a part
            return f"({type(err).__name__}: {err})"


def load_module(path: str | Path, map_location: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                allowed_targets: Sequence[str] = ()):
    """Rebuild the ``VAEModule`` a checkpoint was saved from, with its trained weights (in
    ``dtype`` if given: float64 keeps the weights of a ``64-true`` run as they are); a
    checkpoint of a run with plugins of its own needs their prefixes in ``allowed_targets``
    (``load_checkpoint``)."""
    from vaelab.module import VAEModule

    ckpt = load_checkpoint(path, allowed_targets)
    hp = ckpt["hyper_parameters"]
    module = VAEModule(config=hp["config"], data_info=hp["data_info"])
    if dtype is not None:
        module.to(dtype)
    missing, unexpected = module.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the weights do not fit the model its config describes "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return module.to(map_location)
