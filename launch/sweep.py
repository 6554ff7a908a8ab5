#!/usr/bin/env python
"""Hyperparameter sweeps: a config's get_sweep(arg) (or --grid) -> one run per override dict.

    python launch/sweep.py --config configs/clip.py:tiny                 # print the runs' commands
    python launch/sweep.py --config configs/clip.py:tiny --run           # run them here, one by one
    python launch/sweep.py --config configs/clip.py:tiny --summary       # only (re)write the table
    python launch/sweep.py --config configs/llama.py:tiny --grid optim.lr=1e-3,3e-3 --grid model.depth=2,4
    python launch/sweep.py --config configs/clip.py:tiny --launcher "launch/local.sh 2" [--run]

Each run trains in <workdir>/<name>, where the name comes from the run's overrides
('lr=0.001,hard_negatives=True': stable, and safe as a file name), with the command
`vlm-jax train --config SPEC --workdir <workdir>/<name> [--config.x=y ...] --config.k=v ...`:
the sweep's own `--config.x=y` overrides go to every run, then the run's overrides.

--run runs the runs one after another (each a `python -m vlm_jax.cli train` subprocess, its output
in <run>/train.log; --in-process: the trainer in this process instead), then writes
<workdir>/summary.{md,csv,json}: each run's status, overrides, last train/loss and final eval
metrics (from its metrics.jsonl; per stage for staged configs). A run that failed is marked failed
in the table. Running the sweep again resumes it: finished runs are not run again, failed and
unfinished ones are (the trainer resumes them from their last checkpoint).

--launcher PREFIX: the runs' commands are `PREFIX --config SPEC --workdir ... --config.k=v ...`,
the launcher followed by the arguments of `vlm-jax train` (launch/local.sh 2, launch/tpu_pod.sh
--name my-pod --, sbatch launch/slurm_gpu.sbatch); printed, or with --run run one after another (a
launcher that returns before the run ends, like a plain sbatch, leaves the status to `--summary`
later; `sbatch --wait` waits).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `python launch/sweep.py` from a checkout without `pip install -e .`
    sys.path.insert(0, _REPO)

from vlm_jax import config as config_lib  # noqa: E402

STATUS_FILE = "sweep_status.json"
LOG_FILE = "train.log"
MAX_NAME = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]+")


@dataclass
class Run:
    """One run of a sweep."""

    name: str
    overrides: dict[str, Any]  # the sweep's overrides of this run (the table's columns)
    workdir: str
    command: list[str]  # what --print shows and a launcher runs
    status: str = "pending"  # pending | incomplete | finished | failed | skipped
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Expansion: override dicts -> names and commands.


def format_value(value: Any) -> str:
    """An override value as `--config.k=<text>` takes it (vlm_jax.config.parse_value reads it back)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str)):
        return str(value)
    return repr(value)  # tuples, lists, dicts: a Python literal


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key by its shortest dotted suffix that no other key of the sweep shares."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            short = ".".join(parts[-n:])
            if all(other == key or not (other == short or other.endswith("." + short)) for other in keys):
                break
        out[key] = short
    return out


def run_name(overrides: Mapping[str, Any], short: Mapping[str, str] | None = None) -> str:
    """'optim.lr': 0.001, 'data.hard_negatives': True -> 'lr=0.001,hard_negatives=True'.

    Only [A-Za-z0-9._,=+-] (anything else becomes '_'), at most MAX_NAME characters (longer names
    keep a hash of the whole override set instead of their tail). Stable: the same overrides
    always give the same name.
    """
    if not overrides:
        return "base"
    short = short or {k: k for k in overrides}
    text = ",".join(f"{short.get(k, k)}={format_value(v)}" for k, v in overrides.items())
    name = _UNSAFE.sub("_", text).strip("._") or "run"
    if len(name) > MAX_NAME or name in (".", ".."):
        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=repr).encode()).hexdigest()[:10]
        name = name[: MAX_NAME - 11] + "-" + digest
    return name


def parse_grid(specs: Sequence[str]) -> list[dict[str, Any]]:
    """['optim.lr=1e-3,3e-3', 'model.depth=2,4'] -> their product, as override dicts (values as
    text: each is read as the type of the config value it replaces)."""
    grid: list[dict[str, Any]] = [{}]
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.removeprefix("--config.").removeprefix("config.")
        if not sep or not key or not values:
            raise config_lib.ConfigError(f"--grid {spec!r} is not of the form key=v1,v2,...")
        grid = [dict(point, **{key: v}) for point in grid for v in values.split(",")]
    return grid


def expand(
    spec: str,
    sweep: Sequence[Mapping[str, Any]],
    workdir: str,
    base_overrides: Sequence[str] = (),
    launcher: str = "",
) -> list[Run]:
    """The runs of a sweep: names, workdirs and `vlm-jax train` commands.

    Every run's config is loaded here (an unknown key or a bad value fails before anything runs).
    """
    sweep = [dict(point) for point in sweep]
    keys = list(dict.fromkeys(k for point in sweep for k in point))
    short = _short_keys(keys)
    prefix = shlex.split(launcher) if launcher else []
    runs, seen = [], {}
    for point in sweep:
        name = run_name(point, short)
        if name in seen:
            if seen[name] == point:
                raise config_lib.ConfigError(f"the sweep has the run {name} twice")
            name = run_name(dict(point, _dup=len(runs)), short)  # Different values, same safe name.
        seen[name] = point
        run_overrides = [f"{k}={format_value(v)}" for k, v in point.items()]
        config_lib.load(spec, list(base_overrides) + run_overrides)  # Validates keys and values.
        run_dir = os.path.join(workdir, name)
        # A launcher takes the arguments of `vlm-jax train` (launch/local.sh, tpu_pod.sh, slurm_gpu.sbatch).
        command = prefix if prefix else ["vlm-jax", "train"]
        command = command + ["--config", spec, "--workdir", run_dir]
        command += [f"--config.{o}" for o in base_overrides] + [f"--config.{o}" for o in run_overrides]
        runs.append(Run(name=name, overrides=point, workdir=run_dir, command=command))
    return runs


# ---------------------------------------------------------------------------------------------
# Status and metrics of a run, from its workdir.


def _metric_dirs(spec: str, overrides: Sequence[str], workdir: str) -> list[tuple[str, str, int]]:
    """(column prefix, directory with metrics.jsonl, total steps) per stage ('' for one-stage runs)."""
    from vlm_jax.train import stages

    config = config_lib.load(spec, overrides)
    names = stages.stage_names(config)
    if not names:
        return [("", workdir, int(config.train.steps))]
    out, previous = [], None
    for name in names:
        stage_dir = os.path.join(workdir, name)
        out.append((f"{name}/", stage_dir, int(stages.stage_config(config, name, previous).train.steps)))
        previous = stage_dir
    return out


def _read_records(workdir: str) -> list[dict]:
    """metrics.jsonl's records; a line cut off by a crash is skipped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def final_metrics(records: Sequence[Mapping[str, Any]]) -> tuple[int | None, dict[str, Any]]:
    """(last step, {'train/loss': its last value, every eval metric: its last value}).

    The trainer logs training records (train/* and the data pipeline's data/* counters) and eval
    records (the evaluators' metrics, e.g. val/accuracy) separately; of the training records only
    the loss is kept.
    """
    step, metrics = None, {}
    for record in records:
        step = record.get("step", step)
        if any(key.startswith("train/") for key in record):
            if "train/loss" in record:
                metrics["train/loss"] = record["train/loss"]
            continue
        metrics.update({k: v for k, v in record.items() if k != "step"})
    return step, metrics


def collect(run: Run, spec: str, base_overrides: Sequence[str]) -> Run:
    """Fills run.status and run.info (step, metrics, seconds, error) from its workdir."""
    saved = {}
    status_path = os.path.join(run.workdir, STATUS_FILE)
    if os.path.exists(status_path):
        try:
            with open(status_path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError):
            saved = {"status": "failed", "error": f"unreadable {STATUS_FILE}"}
    info: dict[str, Any] = {k: saved[k] for k in ("seconds", "returncode", "error") if k in saved}
    metrics, done, started = {}, True, False
    try:
        run_overrides = [f"{k}={format_value(v)}" for k, v in run.overrides.items()]
        dirs = _metric_dirs(spec, list(base_overrides) + run_overrides, run.workdir)
    except Exception as e:  # noqa: BLE001 (a config that no longer loads: the run is reported)
        dirs, done = [], False
        info.setdefault("error", f"config: {e}")
    last_step = None
    for prefix, directory, total in dirs:
        records = _read_records(directory)
        step, values = final_metrics(records)
        started = started or bool(records)
        done = done and step is not None and step >= total
        metrics.update({prefix + k: v for k, v in values.items()})
        last_step = f"{prefix}{step}" if prefix and step is not None else step
    info["step"] = last_step
    info["metrics"] = metrics
    if saved.get("status") in ("finished", "failed"):
        status = saved["status"]
    elif done and dirs:
        status = "finished"  # Run by a launcher: its metrics reached the last step.
    else:
        status = "incomplete" if started else "pending"
    run.status, run.info = status, info
    return run


# ---------------------------------------------------------------------------------------------
# Running.


def _write_status(run: Run, **fields: Any) -> None:
    os.makedirs(run.workdir, exist_ok=True)
    record = {"name": run.name, "overrides": run.overrides, "command": shlex.join(run.command), **fields}
    tmp = os.path.join(run.workdir, STATUS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, default=repr)
    os.replace(tmp, os.path.join(run.workdir, STATUS_FILE))


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def run_one(run: Run, spec: str, base_overrides: Sequence[str], *, in_process: bool, launcher: bool) -> None:
    """Runs one run to its end (or failure) and records the outcome in <run>/sweep_status.json."""
    os.makedirs(run.workdir, exist_ok=True)
    status_path = os.path.join(run.workdir, STATUS_FILE)
    if os.path.exists(status_path):
        os.remove(status_path)  # An earlier failure's record: this attempt writes its own.
    log_path = os.path.join(run.workdir, LOG_FILE)
    start = time.time()
    error, returncode = None, 0
    if in_process:
        try:
            _train_in_process(run, spec, base_overrides)
        except Exception as e:  # noqa: BLE001 (the sweep goes on; the table shows the failure)
            error = f"{type(e).__name__}: {e}"
            with open(log_path, "a") as f:
                f.write(traceback.format_exc())
            returncode = 1
    else:
        command = list(run.command)
        if not launcher:  # The same Python as the sweep, whether or not vlm-jax is on PATH.
            command = [sys.executable, "-m", "vlm_jax.cli"] + command[1:]
            env = dict(os.environ)
        else:  # launch/local.sh starts $PYTHON: this one by default.
            env = dict(os.environ, PYTHON=os.environ.get("PYTHON", sys.executable))
        with open(log_path, "a") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            try:
                returncode = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            except OSError as e:
                returncode, error = 127, f"{type(e).__name__}: {e}"
        if returncode and error is None:
            error = f"exit status {returncode}; the end of {log_path}:\n{_tail(log_path)}"
    seconds = round(time.time() - start, 1)
    fields: dict[str, Any] = {"seconds": seconds, "returncode": returncode}
    if error:
        fields["error"] = error
    if returncode:
        _write_status(run, status="failed", **fields)
    elif _reached_end(run, spec, base_overrides):
        _write_status(run, status="finished", **fields)
    # Exit 0 before the last step (preempted: SIGTERM saves and exits 0; or a launcher that only
    # queued the run) records nothing: the run shows as incomplete, and the next sweep resumes it.
    collect(run, spec, base_overrides)
    run.info.setdefault("seconds", seconds)


def _reached_end(run: Run, spec: str, base_overrides: Sequence[str]) -> bool:
    run_overrides = [f"{k}={format_value(v)}" for k, v in run.overrides.items()]
    for _, directory, total in _metric_dirs(spec, list(base_overrides) + run_overrides, run.workdir):
        step, _ = final_metrics(_read_records(directory))
        if step is None or step < total:
            return False
    return True


def _train_in_process(run: Run, spec: str, base_overrides: Sequence[str]) -> None:
    from vlm_jax.train import stages
    from vlm_jax.train.trainer import train

    run_overrides = [f"{k}={format_value(v)}" for k, v in run.overrides.items()]
    config = config_lib.load(spec, list(base_overrides) + run_overrides)
    if stages.stage_names(config):
        stages.train_stages(config, run.workdir)
    else:
        train(config, run.workdir)


# ---------------------------------------------------------------------------------------------
# The summary table.


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def summary_rows(runs: Sequence[Run]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, one row per run): name, status, the swept keys, step, train/loss, eval metrics."""
    swept = list(dict.fromkeys(k for run in runs for k in run.overrides))
    metric_keys = sorted({k for run in runs for k in run.info.get("metrics", {})})
    losses = [k for k in metric_keys if k.endswith("train/loss")]
    evals = [k for k in metric_keys if k not in losses]
    columns = ["name", "status"] + swept + ["step"] + losses + evals + ["seconds"]
    rows = []
    for run in runs:
        row = {"name": run.name, "status": run.status, **run.overrides}
        row["step"] = run.info.get("step")
        row.update(run.info.get("metrics", {}))
        row["seconds"] = run.info.get("seconds")
        rows.append(row)
    return columns, rows


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_summary(runs: Sequence[Run], workdir: str, spec: str) -> dict[str, str]:
    """<workdir>/summary.md, summary.csv and summary.json; returns their paths."""
    os.makedirs(workdir, exist_ok=True)
    columns, rows = summary_rows(runs)
    paths = {ext: os.path.join(workdir, f"summary.{ext}") for ext in ("md", "csv", "json")}
    failed = [r for r in runs if r.status == "failed"]
    text = f"# Sweep {spec}\n\n" + markdown_table(columns, rows)
    if failed:
        text += "\n## Failed runs\n\n"
        for run in failed:
            error = str(run.info.get("error", "")).strip() or "(no error recorded)"
            text += f"### {run.name}\n\n```\n{error}\n```\n\n"
    with open(paths["md"], "w") as f:
        f.write(text)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") if row.get(c) is not None else "" for c in columns})
    with open(paths["csv"], "w", newline="") as f:
        f.write(buffer.getvalue())
    records = [
        {
            "name": run.name,
            "status": run.status,
            "overrides": run.overrides,
            "workdir": run.workdir,
            "command": shlex.join(run.command),
            **run.info,
        }
        for run in runs
    ]
    with open(paths["json"], "w") as f:
        json.dump({"config": spec, "runs": records}, f, indent=2, default=repr)
    return paths


# ---------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/sweep.py", description=__doc__.split("\n")[0],
        epilog="Overrides --config.x=y (or --config.x y) go to every run of the sweep.",
    )
    parser.add_argument("--config", required=True, help="path.py[:variant]; its get_sweep(variant) gives the runs")
    parser.add_argument("--workdir", default=None, help="default: runs/sweep/<config>_<variant>")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="sweep this grid (product over --grid flags) instead of the config's get_sweep")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print", dest="mode", action="store_const", const="print",
                      help="print the runs' commands (the default)")
    mode.add_argument("--run", dest="mode", action="store_const", const="run",
                      help="run the runs not yet finished, one after another, then write the summary")
    mode.add_argument("--summary", dest="mode", action="store_const", const="summary",
                      help="only write the summary of the runs' workdirs")
    parser.add_argument("--launcher", default="", help='command prefix, e.g. "launch/local.sh 2"')
    parser.add_argument("--in-process", action="store_true",
                        help="--run: train in this process (vlm_jax.train.trainer.train), not in subprocesses")
    parser.add_argument("--stop-on-failure", action="store_true", help="--run: stop at the first failed run")
    parser.set_defaults(mode="print")
    return parser


def _default_workdir(spec: str) -> str:
    path, arg = config_lib.split_spec(spec)
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", "sweep", f"{stem}_{arg}" if arg else stem)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        rest, base_overrides = config_lib.split_overrides(argv)
        args = build_parser().parse_args(rest)
        if args.in_process and args.launcher:
            raise config_lib.ConfigError("--in-process and --launcher exclude each other")
        sweep = parse_grid(args.grid) if args.grid else config_lib.get_sweep(args.config)
        if not sweep:
            raise config_lib.ConfigError(f"{args.config} has no get_sweep(arg) runs; give --grid KEY=V1,V2")
        swept = {k for point in sweep for k in point}
        pinned = sorted(swept & {o.partition("=")[0] for o in base_overrides})
        if pinned:
            print(f"note: the sweep sets {', '.join(pinned)} per run, over the command line's value",
                  file=sys.stderr)
        workdir = args.workdir or _default_workdir(args.config)
        runs = expand(args.config, sweep, workdir, base_overrides, args.launcher)
    except (config_lib.ConfigError, ValueError) as e:
        print(f"sweep: config error: {e}", file=sys.stderr)
        return 2

    if args.mode == "print":
        for run in runs:
            print(shlex.join(run.command))
        return 0

    if args.mode == "run":
        for i, run in enumerate(runs, 1):
            collect(run, args.config, base_overrides)
            head = f"[{i}/{len(runs)}] {run.name}"
            if run.status == "finished":
                print(f"{head}: finished before, not run again", flush=True)
                continue
            print(f"{head}: running (log: {os.path.join(run.workdir, LOG_FILE)})", flush=True)
            run_one(run, args.config, base_overrides, in_process=args.in_process, launcher=bool(args.launcher))
            seconds = run.info.get("seconds")
            print(f"{head}: {run.status}" + (f" in {seconds:.0f}s" if seconds else ""), flush=True)
            if run.status == "failed":
                print(f"  {str(run.info.get('error', '')).strip()}", flush=True)
                if args.stop_on_failure:
                    break
    for run in runs:
        if not run.info:
            collect(run, args.config, base_overrides)
    paths = write_summary(runs, workdir, args.config)
    columns, rows = summary_rows(runs)
    print()
    print(markdown_table(columns, rows), end="")
    print(f"\nsummary: {paths['md']} {paths['csv']} {paths['json']}")
    return 1 if any(run.status == "failed" for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
