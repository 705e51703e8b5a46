"""One table for a multirun: ``python report.py <multirun folder>`` (or ``vaelab-report``).

Every run under the folder (a folder holding ``summary.json``, or a sweep job's folder without
one: running now, an evaluation, killed, or failed before training) becomes one row: its overrides
(one column per overridden key, from ``<run>/.hydra/overrides.yaml``), best ``val/elbo``,
``test/nll``, ``test/bpd``, active units and wall time. The table is printed as markdown and
written to ``report.md`` and ``report.csv`` in the folder, and ``report.png`` draws each run's
validation bounds per epoch (from its CSV or offline W&B log): what the W&B runs table and its
charts show online, for offline users.

``--over seed`` (any overridden key, or several) adds a second table: the runs grouped by their
other overrides, each number as mean ± sd (the sample standard deviation, n − 1) over the
group's finished runs, with n and the runs that are not finished (``report-over-seed.csv``:
the means and sds as columns of their own). Papers' "± over 5 seeds" is that table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

NUMBERS = (
    ("best val/elbo", lambda s: s.get("best_val_elbo")),
    # runs whose checkpoint callback monitors val/iwae (experiment=iwae_mnist); a column where any has it
    ("best val/iwae", lambda s: s.get("best_score") if s.get("best_monitor") == "val/iwae" else None),
    ("test/nll", lambda s: (s.get("test") or {}).get("test/nll")),
    ("test/bpd", lambda s: (s.get("test") or {}).get("test/bpd")),
    ("active units", lambda s: (s.get("diagnostics") or {}).get("active_units")),
    ("wall time (s)", lambda s: s.get("wall_time_s")),
)


#: the per-epoch numbers ``report.png`` draws (those a run logged)
CURVES = ("val/elbo", "val/iwae")


def read_overrides(run: Path) -> dict[str, str]:
    """``key=value`` pairs of the run's task overrides (Hydra's ``.hydra/overrides.yaml``)."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    import yaml

    out: dict[str, str] = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        out[key.lstrip("+~")] = value
    return out


def read_settings(run: Path, summary: dict[str, Any] | None) -> dict[str, str]:
    """The run's settings as its numbers came from them: its task overrides (``read_overrides``)
    with each resume's on top (``summary``, its ``summary.json``: the commands' overrides; a run
    continued with ``trainer.max_epochs=3`` trained 3 epochs, not the 2 it started with). A
    resume's ``experiment=`` and ``hparams_search=`` are not applied (``vaelab.runs``), nor shown;
    nor is the ``ckpt_path=last`` of a job that a requeued sweep started afresh (a group of its
    own in ``--over``). An evaluation's ``ckpt_path`` (``eval.py -m ckpt_path=a,b``) is shown."""
    out = read_overrides(run)
    if out.get("ckpt_path") == "last":
        del out["ckpt_path"]
    summary = summary or {}
    commands = summary.get("commands") or [{"resumed_with": summary.get("resumed_with")}]
    for command in commands:
        for item in (command.get("resumed_with") if isinstance(command, dict) else None) or []:
            key, _, value = str(item).partition("=")
            key = key.lstrip("+")
            if key.startswith("~"):
                out.pop(key[1:], None)
            elif key not in ("ckpt_path", "experiment", "hparams_search") and not key.startswith("hydra"):
                out[key] = value
    return out


def _sweep_job(hydra_dir: Path) -> bool:
    """Whether the run that holds this ``.hydra`` folder is a job of a sweep: its sweep folder
    holds Hydra's ``multirun.yaml`` (a grid sweep), or its own ``hydra.yaml`` says so (the
    Optuna sweeper writes no multirun.yaml)."""
    if (hydra_dir.parent.parent / "multirun.yaml").is_file():
        return True
    try:
        return "mode: MULTIRUN" in (hydra_dir / "hydra.yaml").read_text()
    except OSError:
        return False


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as ``path`` (summary.json, metrics.json), replaced in one step: a reader sees
    the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def error_text(error: BaseException) -> str:
    """An error as summary.json records it: its type and (the start of) its message."""
    return f"{type(error).__name__}: {str(error)[:2000]}"


#: the keys of a summary.json that hold an object
SUMMARY_OBJECTS = ("test", "diagnostics", "trained", "evaluation", "data")


def read_summary(run: Path) -> dict[str, Any] | None:
    """The run's ``summary.json``; None where it wrote none. A file that cannot be read raises
    ``OSError``, or ``ValueError`` (``json.JSONDecodeError``: cut short, not JSON, or JSON but no
    object). NaN and ±Infinity, which Python's json writes for non-finite numbers, are read."""
    path = run / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if not isinstance(summary, dict):
        raise ValueError(f"it holds a JSON {type(summary).__name__}, not an object")
    for key in SUMMARY_OBJECTS:  # (report.py's columns and a resume read into these)
        if summary.get(key) is not None and not isinstance(summary[key], dict):
            raise ValueError(f"its {key!r} is a JSON {type(summary[key]).__name__}, not an object")
    return summary


def failure(summary: dict[str, Any] | None) -> str | None:
    """Why a run failed, from its summary: None if it did not, its error on one line ("" where
    it names none); a sweep job without a summary stopped before training."""
    if summary is None:
        return "no summary.json: it stopped before training (see its log)"
    return " ".join(str(summary.get("error") or "").split()) if summary.get("failed") else None


def without_summary(run: Path) -> tuple[str, dict[str, Any] | None]:
    """The status of a run folder without ``summary.json``, and what stands in for it: a job
    running now, an evaluation (``eval.py``'s ``metrics.json``), a training run stopped after
    its first checkpoint (killed: continue it), or a job that stopped before training."""
    from vaelab.folders import writer  # (folders imports this module)

    busy = writer(run)
    if busy:
        return f"running ({busy})", None
    path = run / "metrics.json"
    if path.is_file():  # an evaluation's folder
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return f"failed: metrics.json cannot be read ({type(err).__name__}): cut short, or not JSON; evaluate again", None
        if isinstance(metrics, dict) and isinstance(metrics.get("metrics"), dict):
            diagnostics = metrics.get("diagnostics")
            return "ok (eval.py)", {"test": metrics["metrics"],
                                    "diagnostics": diagnostics if isinstance(diagnostics, dict) else None}
        return "failed: metrics.json holds no metrics object; evaluate again", None
    recorded = _recorded_failure(run)
    if recorded:  # (an evaluation sweep's job that failed: its error, as the sweep's end listed it)
        return f"failed: {' '.join(recorded.split())}", None
    if any((run / "checkpoints").glob("*.ckpt")):
        return (f"failed: stopped after its training began, without a summary.json (killed?); continue it: "
                f"python train.py ckpt_path={run}"), None
    if _task_name(run) == "eval":
        return "failed: no metrics.json: the evaluation stopped before writing it (killed? see its log)", None
    return f"failed: {failure(None)}", None


def _recorded_failure(run: Path) -> str | None:
    """The latest error that the sweep ``run`` is a job of recorded for it
    (``vaelab.folders.SWEEP_FAILURES`` in the sweep's folder), if any."""
    from vaelab.folders import sweep_failures

    errors = [why for job, why in sweep_failures(run.parent, since=0.0) if job.name == run.name]
    return errors[-1] if errors else None


def _task_name(run: Path) -> str | None:
    """The stored config's ``task_name`` (train, eval; a user's own name for a run), read as a
    line: the whole config need not be parsed for it."""
    try:
        lines = (run / ".hydra" / "config.yaml").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("task_name:")), None)


def run_order(run: Path, root: Path) -> tuple:
    """Sort key of a run folder under ``root``: job numbers as numbers (2 before 10)."""
    rel = run.relative_to(root).parts
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in rel)


def collect(folder: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns and rows of the table, one row per run under ``folder``."""
    root = Path(folder)
    # a run wrote summary.json; a sweep job that stopped before that (or runs now) has only
    # Hydra's .hydra folder
    found = {p.parent for p in root.rglob("summary.json")}
    found |= {p.parent for p in root.rglob(".hydra") if p.is_dir() and _sweep_job(p)}
    found |= {p.parent for p in root.rglob("metrics.json")}  # eval.py's
    runs = sorted(found, key=lambda r: run_order(r, root))
    rel = {run: str(run.relative_to(root)) or "." for run in runs}  # each row's name
    overrides: dict[Path, dict[str, str]] = {}
    unread: dict[Path, str] = {}  # runs whose overrides cannot be read: their settings' cells stay empty
    summaries: dict[Path, tuple[dict[str, Any] | None, Exception | None]] = {}  # each read once
    for run in runs:
        try:
            summaries[run] = (read_summary(run), None)
        except (OSError, ValueError) as err:  # one damaged file is that row's, not the table's
            summaries[run] = (None, err)
        try:
            overrides[run] = read_settings(run, summaries[run][0])
        except Exception as err:  # noqa: BLE001 - yaml's errors, OSError: that row's, not the table's
            overrides[run] = {}
            unread[run] = f"{Path(rel[run]) / '.hydra' / 'overrides.yaml'} cannot be read ({type(err).__name__})"
    keys: list[str] = []
    for ov in overrides.values():
        keys += [k for k in ov if k not in keys]
    # keys every run sets alike (the sweep's constants) stay: they say how the numbers were got
    rows = []
    for run in runs:
        status = None
        summary, unreadable = summaries[run]
        try:
            if unreadable is not None:
                raise unreadable
            why = failure(summary)
            if summary is None:
                status, summary = without_summary(run)
        except (OSError, ValueError) as err:  # one damaged file is that row's, not the table's
            summary = None
            message = (str(err).splitlines() or [""])[0][:120]
            hint = ": cut short, or not JSON" if isinstance(err, json.JSONDecodeError) else ""
            why = f"{Path(rel[run]) / 'summary.json'} cannot be read ({type(err).__name__}: {message}){hint}"
        row: dict[str, Any] = {"run": rel[run]}
        row.update({k: overrides[run].get(k, "") for k in keys})
        row.update({name: get(summary or {}) for name, get in NUMBERS})
        row["status"] = status or ("ok" if why is None else f"failed: {why[:300]}" if why else "failed")
        if run in unread:
            row["status"] += f"; {unread[run]}: its settings are not shown"
        rows.append(row)
    numbers = [name for name, _ in NUMBERS]
    if all(row["best val/iwae"] is None for row in rows):  # no run monitors it: no empty column
        numbers.remove("best val/iwae")
        for row in rows:
            del row["best val/iwae"]
    columns = ["run", *keys, *numbers, "status"]
    return columns, rows


def numbers_of(columns: list[str]) -> list[str]:
    """The number columns of a table ``collect`` made."""
    return [c for c in columns if c in dict(NUMBERS)]


def group_over(columns: list[str], rows: list[dict[str, Any]], over: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """The runs grouped by their overrides other than ``over`` (e.g. ``["seed"]``): one row per
    group with ``n`` (its finished runs, status ``ok``), ``runs`` (their names), ``not ok`` (the
    others: failed, killed, running; they are left out of the numbers) and, for each number,
    ``<number> mean`` and ``<number> sd`` (sample sd, n − 1; None where n < 2) over the
    finished runs that have it. A non-finite value (a NaN loss's run) makes its group's mean
    non-finite: shown, not dropped."""
    numbers = numbers_of(columns)
    settings = [c for c in columns if c not in ("run", "status", *numbers)]
    unknown = [k for k in over if k not in settings]
    if unknown:
        from vaelab.validation import nearest

        fixed = [k if k in settings else nearest(k, settings) for k in over]
        hint = f" (did you mean --over {' '.join(fixed)}?)" if all(fixed) else ""  # type: ignore[arg-type]
        raise KeyError(f"--over {' '.join(unknown)}: no run overrides {'it' if len(unknown) == 1 else 'them'}{hint}; "
                       f"the overridden keys are {', '.join(settings) or 'none'}")
    by = [c for c in settings if c not in over]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(k, "")) for k in by), []).append(row)
    out = []
    for values, members in groups.items():
        ok = [r for r in members if str(r.get("status", "")).startswith("ok")]
        group: dict[str, Any] = dict(zip(by, values, strict=True))
        group.update({"n": len(ok), "runs": ", ".join(r["run"] for r in ok),
                      "not ok": ", ".join(r["run"] for r in members if r not in ok),
                      "_members": [r["run"] for r in ok]})  # (not a column: report.png's groups)
        for name in numbers:
            got = [float(r[name]) for r in ok if r.get(name) is not None]
            group[f"{name} mean"] = statistics.fmean(got) if got else None
            finite = all(math.isfinite(v) for v in got)
            group[f"{name} sd"] = None if len(got) < 2 else statistics.stdev(got) if finite else math.nan
        out.append(group)
    stats = [f"{name} {what}" for name in numbers for what in ("mean", "sd")]
    return [*by, "n", *stats, "runs", "not ok"], out


def grouped_markdown(columns: list[str], groups: list[dict[str, Any]]) -> str:
    """The grouped table with each number as one ``mean ± sd`` cell."""
    numbers = [c[: -len(" mean")] for c in columns if c.endswith(" mean")]
    head = [c for c in columns if not c.endswith((" mean", " sd"))]
    shown = [*head[: head.index("n") + 1], *numbers, *head[head.index("n") + 1:]]
    rows = []
    for g in groups:
        row = {c: g.get(c) for c in head}
        for name in numbers:
            mean, sd = g[f"{name} mean"], g[f"{name} sd"]
            row[name] = "" if mean is None else _fmt(mean, name) + ("" if sd is None else f" ± {_fmt(sd, name)}")
        rows.append(row)
    return to_markdown(shown, rows)


def _fmt(value: Any, column: str = "") -> str:
    """A cell of the markdown table: 4 decimals (4 significant digits from 10⁴ on), seconds to
    0.1 s, and ``nan`` / ``inf`` / ``-inf`` as such."""
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)  # nan, inf, -inf
        if column == "wall time (s)":
            return f"{value:.1f}"
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def to_markdown(columns: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c), c).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def read_curves(run: Path, metrics: tuple[str, ...] = CURVES) -> dict[str, dict[int, float]]:
    """``{metric: {epoch: value}}`` of a run: from its ``csv/metrics.csv`` (``logger=csv``), else
    its offline W&B runs (a resumed run has one per command, read in order of start). A
    resume repeats the epochs after its checkpoint: the later value of an epoch is kept.
    ``{}`` where the run logged neither (``logger=none``) or its files cannot be read."""
    found: dict[str, dict[int, float]] = {m: {} for m in metrics}
    table = run / "csv" / "metrics.csv"
    try:
        if table.is_file():
            with open(table, newline="") as f:
                rows: list[dict[str, Any]] = list(csv.DictReader(f))
        else:
            from vaelab.wandb_offline import find_runs, read_run

            rows = [row for path in find_runs(run) for row in read_run(path).history]
        for row in rows:
            for m in metrics:
                if row.get(m) not in (None, "") and row.get("epoch") not in (None, ""):
                    found[m][int(float(row["epoch"]))] = float(row[m])
    except Exception:  # noqa: BLE001 - a damaged log costs that run's curve, not the report
        return {}
    return {m: v for m, v in found.items() if v}


def curve_lines(curves: dict[str, dict[str, dict[int, float]]], metric: str, groups: dict[str, list[str]] | None = None,
                ) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """The lines ``draw_curves`` draws for ``metric``: ``{label: (epochs, mean, sd)}``, one per run
    (sd 0), or one per group, at each epoch the mean and sample sd of the group's runs that have
    it (sd 0 where one run has it, or a value is not finite). Lines with no point are left out."""
    out = {}
    for label, members in (groups or {run: [run] for run in curves}).items():
        epochs = sorted({e for r in members for e in curves.get(r, {}).get(metric, {})})
        if epochs:
            at = [[curves[r][metric][e] for r in members if e in curves.get(r, {}).get(metric, {})] for e in epochs]
            out[label] = (epochs, [statistics.fmean(v) for v in at],
                          [statistics.stdev(v) if len(v) > 1 and all(map(math.isfinite, v)) else 0.0 for v in at])
    return out


def draw_curves(path: Path, curves: dict[str, dict[str, dict[int, float]]],
                groups: dict[str, list[str]] | None = None) -> bool:
    """``report.png``: each metric of ``CURVES`` that some run logged, per epoch, one line per run
    (``curves``: ``{run label: {metric: {epoch: value}}}``); with ``groups`` (``{group label:
    [run labels]}``, from ``--over``) one line per group, its mean over the runs, in a band of
    ± one sd where two or more have the epoch. False (nothing drawn) where no run has a curve."""
    metrics = [m for m in CURVES if any(m in c for c in curves.values())]
    if not metrics:
        return False
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.0 * len(metrics), 4.2), dpi=110, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    # one colour per line in every panel, and one legend for them all: a run that logged one of
    # the metrics only keeps its colour (and its legend entry)
    labels = list(groups or curves)
    colour = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    drawn: dict[str, Any] = {}
    for ax, metric in zip(axes, metrics, strict=True):
        for label, (epochs, mean, sd) in curve_lines(curves, metric, groups).items():
            (line,) = ax.plot(epochs, mean, marker="o" if len(epochs) < 30 else None, markersize=3, linewidth=1.2,
                              color=colour[label], label=label if groups is None else f"{label} (n={len(groups[label])})")
            drawn.setdefault(label, line)
            if groups is not None:
                ax.fill_between(epochs, [m - d for m, d in zip(mean, sd, strict=True)],
                                [m + d for m, d in zip(mean, sd, strict=True)], color=colour[label], alpha=0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{metric} (nats per example)")
        ax.set_title(f"{metric}{' (mean ± sd)' if groups else ''}: higher is better")
        ax.grid(alpha=0.3)
    # a key for two lines or more, or for groups (it gives their n); one run's lines need none
    keyed = len(drawn) > 1 or (groups is not None and len(drawn) == 1)
    if keyed and len(drawn) <= 16:
        handles = [drawn[label] for label in labels if label in drawn]
        # beside the panels, not on their lines
        fig.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="outside right upper")
    fig.savefig(path)
    canvas.draw()
    return True


def over_csv_name(over: list[str]) -> str:
    """The file ``--over`` writes its table to: ``report-over-seed.csv``."""
    return f"report-over-{'-'.join(k.replace('/', '_') for k in over)}.csv"


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:  # full precision in the CSV
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in columns})


def write_report(folder: str | Path, over: list[str] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Write ``report.md`` and ``report.csv`` into ``folder`` (and, with ``over``, the grouped
    table into ``report.md`` and ``report-over-<keys>.csv``); returns the markdown and rows."""
    root = Path(folder)
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise FileNotFoundError(f"{root} {what}: give the folder of a sweep (outputs/train/multirun/<date>/<time>) "
                                "or of a run (outputs/train/<date>/<time>)")
    columns, rows = collect(root)
    if not rows:
        raise FileNotFoundError(f"no runs under {root}: a run folder holds summary.json (written by train.py)")
    markdown = to_markdown(columns, rows)
    numbers = numbers_of(columns)
    settings = [c for c in columns if c not in ("run", "status", *numbers)]

    varying = [k for k in settings if len({str(r.get(k, "")) for r in rows}) > 1]

    def label(row: dict[str, Any], keys: list[str]) -> str:  # the settings that differ between the lines
        return ", ".join(f"{k}={row.get(k, '')}" for k in varying if k in keys)

    curves = {row["run"]: read_curves(root / row["run"]) for row in rows}
    named = {f"{row['run']}: {label(row, settings)}".rstrip(": "): curves[row["run"]] for row in rows}
    lines: dict[str, list[str]] | None = None
    if over:
        grouped_columns, groups = group_over(columns, rows, over)
        write_csv(root / over_csv_name(over), grouped_columns, groups)
        markdown += (f"\nmean ± sd over {', '.join(over)} (finished runs; sd: n − 1)\n\n"
                     + grouped_markdown(grouped_columns, groups))
        by = [k for k in settings if k not in over]
        named = {row["run"]: curves[row["run"]] for row in rows}
        lines = {(label(g, by) or "all runs"): g["_members"] for g in groups if g["_members"]}
    if draw_curves(root / "report.png", named, lines):
        markdown += "\n![the runs' validation bounds per epoch](report.png)\n"
    else:  # (no run logged a curve: an earlier report's picture would not be this one's)
        (root / "report.png").unlink(missing_ok=True)
    (root / "report.md").write_text(markdown)
    write_csv(root / "report.csv", columns, rows)
    return markdown, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vaelab-report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a multirun folder (e.g. outputs/train/multirun/<date>/<time>) or a run folder")
    parser.add_argument("--over", nargs="+", metavar="KEY", default=[],
                        help="also a table of mean ± sd over these overridden keys (e.g. --over seed), the runs "
                             "grouped by their other overrides")
    args = parser.parse_args(argv)
    try:
        markdown, _ = write_report(args.folder, args.over)
    except (FileNotFoundError, KeyError) as err:
        print(f"vaelab report: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 1
    written = ["report.md", "report.csv"] + (["report.png"] if (Path(args.folder) / "report.png").is_file() else [])
    if args.over:
        written.append(over_csv_name(args.over))
    try:
        print(markdown, end="")
        print(f"\nwritten to {', '.join(str(Path(args.folder) / w) for w in written)}", flush=True)
    except BrokenPipeError:  # (report.py ... | head: the reader has what it wanted; the files are written)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
