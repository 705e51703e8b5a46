"""Read an offline W&B run from disk: its history rows, config and summary, with no account
and no network.

An offline run (``<output>/wandb/offline-run-*/run-<id>.wandb``) is a log in the LevelDB
format: a 7-byte file header (``:W&B``, a 2-byte magic, a version byte), then 32 KiB blocks
of records, each with a 7-byte header (4-byte checksum, 2-byte little-endian length, 1-byte
type: full / first / middle / last) so that a record can span blocks. Each record is a
``wandb.proto.wandb_internal_pb2.Record``.

The wandb package no longer ships a Python reader for this format (its core is written in
Go since 0.18), so this is the small one vaelab's tests, and offline users, read runs with.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK_SIZE = 32 * 1024
HEADER_SIZE = 7
FILE_HEADER = b":W&B"
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_record_bytes(path: str | Path) -> Iterator[bytes]:
    """The payloads of the records in a ``.wandb`` file, reassembled across blocks."""
    data = Path(path).read_bytes()
    if not data.startswith(FILE_HEADER):
        raise ValueError(f"{path} is not a W&B run file (no :W&B header)")
    pos = HEADER_SIZE
    pending: list[bytes] = []
    while pos + HEADER_SIZE <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < HEADER_SIZE:  # the block's tail is padding
            pos += left_in_block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER_SIZE])
        pos += HEADER_SIZE
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:  # zero padding at the end of a file
            break
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = [chunk]
        elif kind == MIDDLE:
            pending.append(chunk)
        elif kind == LAST:
            pending.append(chunk)
            yield b"".join(pending)
            pending = []
        else:
            raise ValueError(f"{path}: unknown record type {kind} at byte {pos - length - HEADER_SIZE}")


def _items(update: Any) -> dict[str, Any]:
    """Items to a dict; nested keys (images are logged as nested dicts) become nested dicts."""
    out: dict[str, Any] = {}
    for item in update:
        path = list(item.nested_key) or [item.key]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


@dataclass
class OfflineRun:
    """What an offline run holds, as plain Python values."""

    path: Path
    run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    #: each ``define_metric``, by its name (or glob): its ``step_metric`` and ``summary`` (the
    #: names of the summaries set true, e.g. ``["max"]``)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    def values(self, key: str) -> list[Any]:
        """Every logged value of ``key``, in order."""
        return [row[key] for row in self.history if key in row]

    @property
    def keys(self) -> set[str]:
        return {k for row in self.history for k in row}

    @property
    def files_dir(self) -> Path:
        return self.path.parent / "files"


def read_run(path: str | Path) -> OfflineRun:
    """Read a run from its ``.wandb`` file or its ``offline-run-*`` folder."""
    from wandb.proto import wandb_internal_pb2 as pb

    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("*.wandb"))
        if not found:
            raise FileNotFoundError(f"no .wandb file in {p}")
        p = found[0]
    run = OfflineRun(path=p)
    for payload in iter_record_bytes(p):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "run":
            run.run_id = record.run.run_id
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
        elif kind == "metric":
            metric = record.metric
            run.metrics[metric.name or metric.glob_name] = {
                "step_metric": metric.step_metric,
                "summary": [f.name for f, value in metric.summary.ListFields() if value is True]}
    return run


def find_runs(folder: str | Path) -> list[Path]:
    """The offline runs under a folder (a run's output folder, or a whole multirun)."""
    return sorted(Path(folder).rglob("offline-run-*/run-*.wandb"))
