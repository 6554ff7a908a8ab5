"""`python -m vlm_jax.bench.gpu`: every figure a GPU must settle, in one command of at most
--budget seconds (default 8 minutes), with the peers measured in the same run.

    python -m vlm_jax.bench.gpu [--out bench_results] [--budget 480] [--sections a,b,...]
        [--small --interpret] [--peak-tflops T] [--peak-bandwidth B/s] [--steps N] [--warmup N]
        [--configs DIR]

Sections, in this order, each in a child process of its own (`--section NAME --result FILE`):
probe (device and versions), kernel_tests (`pytest -m gpu tests/kernels`), llama_{ours,plain,
torch} (tinyllama_1b train step, batch 8 x 2048), clip_{ours,plain,torch} (ViT-B/16 CLIP, batch
256), decode_{ours,torch} (batch-1 greedy decode), kernels_vq and kernels_attention (the tables of
`python -m vlm_jax.bench.kernels`). Own processes because JAX preallocates 75% of the GPU (torch
and JAX must not share one) and so that a crash, OOM or hang loses only its own section.

Budget: a section may run for its share of the time left (its SHARE over the shares of the
sections still to run), so an expensive section cannot starve the rest and time a section leaves
unused goes to those after it; past its timeout the child's process group is killed and the
section reported as timed out, with the end of its stderr. OUT/gpu_report.md and
OUT/gpu_report.json are rewritten after every section (a kill leaves what finished); children
write OUT/sections/NAME.json and OUT/logs/NAME.{stdout,stderr}. The markdown is printed at the end.

--small --interpret: the same code paths at toy sizes on a CPU (Pallas in interpret mode); a CPU
has no known peak, so MFU and the bandwidth fraction need --peak-tflops / --peak-bandwidth there.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from vlm_jax.bench import gpu_report
from vlm_jax.bench.common import PeerSkipped, write_json

DEFAULT_BUDGET_S = 480.0
# Below this a section cannot even start a Python with JAX: it is skipped instead.
MIN_SECTION_S = 5.0
STDERR_TAIL_CHARS = 4000
VERSIONED = ("jax", "jaxlib", "flax", "optax", "torch", "transformers")


@dataclasses.dataclass(frozen=True)
class Section:
    """One child process: `target` ("module:function") called with the parsed command line."""

    name: str
    target: str
    share: float
    torch: bool = False  # A PyTorch section: its child gets JAX_PLATFORMS=cpu.


_JAX, _TORCH = "vlm_jax.bench.gpu_sections", "vlm_jax.bench.torch_peers"
# Shares in percent of the budget, from estimates for an H100 (compile + 13 steps for the train
# steps; the attention table compiles about 80 kernels).
SECTIONS = (
    Section("probe", f"{_JAX}:probe", 6),  # A cold machine: importing jax and starting CUDA.
    Section("kernel_tests", "vlm_jax.bench.gpu_kernel_tests:kernel_tests", 13),
    Section("llama_ours", f"{_JAX}:llama_ours", 10),
    Section("llama_plain", f"{_JAX}:llama_plain", 9),
    Section("llama_torch", f"{_TORCH}:llama_train", 8, torch=True),
    Section("clip_ours", f"{_JAX}:clip_ours", 7),
    Section("clip_plain", f"{_JAX}:clip_plain", 7),
    Section("clip_torch", f"{_TORCH}:clip_train", 6, torch=True),
    Section("decode_ours", f"{_JAX}:decode_ours", 6),
    Section("decode_torch", f"{_TORCH}:llama_decode", 5, torch=True),
    Section("kernels_vq", f"{_JAX}:kernels_vq", 6),
    Section("kernels_attention", f"{_JAX}:kernels_attention", 17),
)
BY_NAME = {s.name: s for s in SECTIONS}


def section_modules() -> list[str]:
    """Every module a section's child imports first (what the GPU machine must be able to import)."""
    return sorted({s.target.split(":")[0] for s in SECTIONS})


def section_timeout(remaining_s: float, share: float, shares_left: float) -> float:
    """This section's share of the time left: remaining x share / (shares of it and those after)."""
    return max(remaining_s, 0.0) * share / shares_left


def _tail(path: str, chars: int = STDERR_TAIL_CHARS) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def run_child(name: str, argv: Sequence[str], env: dict[str, str], timeout_s: float, out_dir: str,
              result_path: str) -> dict[str, Any]:
    """Runs one child in its own process group; its entry: status ok / skipped / failed / timeout."""
    logs = os.path.join(out_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    stderr_path = os.path.join(logs, f"{name}.stderr")
    start = time.monotonic()
    timed_out = False
    with open(os.path.join(logs, f"{name}.stdout"), "w") as out, open(stderr_path, "w") as err:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # The whole group: pytest's children too.
            returncode = proc.wait()
    entry: dict[str, Any] = dict(status="ok", seconds=time.monotonic() - start, timeout_s=timeout_s,
                                 returncode=returncode, result=None, reason="", stderr_tail="")
    if os.path.exists(result_path):
        with open(result_path) as f:
            entry["result"] = json.load(f)
    if timed_out:
        entry.update(status="timeout", reason=f"timed out after {timeout_s:.0f} s")
    elif returncode != 0:
        entry.update(status="failed", reason=f"exit status {returncode}")
    elif entry["result"] is None:
        entry.update(status="failed", reason="the child wrote no result")
    elif "section_skipped" in entry["result"]:
        entry.update(status="skipped", reason=str(entry["result"]["section_skipped"]))
    if entry["status"] in ("failed", "timeout"):
        entry["stderr_tail"] = _tail(stderr_path)
    return entry


ArgvFor = Callable[[Section, str, float, dict[str, Any]], list[str]]


def run_all(sections: Sequence[Section], argv_for: ArgvFor, header: dict[str, Any], budget_s: float,
            out_dir: str, log: TextIO | None = sys.stdout) -> dict[str, Any]:
    """Runs the sections in order within the budget; rewrites the report after each one.

    argv_for(section, result_path, timeout_s, report so far) -> the child's command line.
    """
    os.makedirs(os.path.join(out_dir, "sections"), exist_ok=True)
    report: dict[str, Any] = dict(header=header, budget_s=budget_s, order=[s.name for s in sections],
                                  sections={}, total_s=0.0)
    start = time.monotonic()
    for i, section in enumerate(sections):
        remaining = budget_s - (time.monotonic() - start)
        timeout = section_timeout(remaining, section.share, sum(s.share for s in sections[i:]))
        if timeout < MIN_SECTION_S:
            entry = dict(status="skipped", seconds=0.0, timeout_s=timeout, returncode=None, result=None,
                         reason=f"no time left in the budget ({remaining:.0f} s of {budget_s:.0f} s)",
                         stderr_tail="")
        else:
            result_path = os.path.join(out_dir, "sections", f"{section.name}.json")
            if os.path.exists(result_path):
                os.remove(result_path)  # A stale result must not pass for this run's.
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if section.torch:
                env["JAX_PLATFORMS"] = "cpu"
            argv = argv_for(section, result_path, timeout, report)
            entry = run_child(section.name, argv, env, timeout, out_dir, result_path)
        report["sections"][section.name] = entry
        report["total_s"] = time.monotonic() - start
        gpu_report.write(report, out_dir)
        if log is not None:
            print(f"[{i + 1}/{len(sections)}] {section.name}: {entry['status']} in {entry['seconds']:.1f} s "
                  f"(timeout {entry['timeout_s']:.0f} s){': ' + entry['reason'] if entry['reason'] else ''}",
                  file=log, flush=True)
    return report


def _shared_flags(args: argparse.Namespace) -> list[str]:
    """The command-line options every child gets from the parent."""
    flags = ["--small"] * args.small + ["--interpret"] * args.interpret
    for name in ("steps", "warmup", "configs"):
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def child_argv(args: argparse.Namespace) -> ArgvFor:
    """argv_for of the real sections: this module with --section, the shared flags and the probed
    platform (the kernel tests need it to point JAX at the GPU)."""

    def argv_for(section: Section, result_path: str, timeout_s: float, report: dict[str, Any]) -> list[str]:
        probe = report["sections"].get("probe")
        probed = (probe or {}).get("result") or {}
        return [sys.executable, "-m", "vlm_jax.bench.gpu", "--section", section.name, "--result", result_path,
                "--deadline-s", f"{timeout_s:.1f}", "--platform", str(probed.get("platform", "unknown")),
                *_shared_flags(args)]

    return argv_for


def _nvidia_smi() -> str | None:
    """The GPU's name and driver from nvidia-smi (without touching CUDA from this process)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def header(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Date, command, versions (from the installed metadata: this process never imports torch
    or initialises a JAX backend, which would take GPU memory from the children) and flags."""
    versions = {}
    for package in VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python -m vlm_jax.bench.gpu " + shlex.join(argv), versions=versions,
                python=platform.python_version(), gpu=_nvidia_smi(), small=args.small, interpret=args.interpret,
                peak_tflops=args.peak_tflops, peak_bandwidth=args.peak_bandwidth)


def run_section(args: argparse.Namespace) -> int:
    """Child mode: runs one section and writes its result (PeerSkipped: {"section_skipped": why})."""
    module, function = BY_NAME[args.section].target.split(":")
    try:
        result = getattr(importlib.import_module(module), function)(args)
    except PeerSkipped as e:
        result = dict(section_skipped=str(e))
    write_json(args.result, result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `python -m vlm_jax.bench.gpu`."""
    parser = argparse.ArgumentParser(prog="python -m vlm_jax.bench.gpu", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--out", default="bench_results", help="report folder (default ./bench_results)")
    add("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for everything (default 480)")
    add("--sections", default=None, help=f"comma-separated subset of {', '.join(BY_NAME)}")
    add("--small", action="store_true", help="toy sizes (a CPU, tests)")
    add("--interpret", action="store_true", help="Pallas kernels in interpret mode")
    add("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default: by device)")
    add("--peak-bandwidth", type=float, default=None, help="peak memory bandwidth, B/s (default: by device)")
    add("--steps", type=int, default=None, help="timed train steps (default 10; --small 2)")
    add("--warmup", type=int, default=None, help="untimed train steps first (default 3; --small 1)")
    add("--configs", default=None, help="config folder (default ./configs, else the one beside the package)")
    # Child mode (set by the parent).
    add("--section", choices=list(BY_NAME), default=None, help=argparse.SUPPRESS)
    add("--result", default=None, help=argparse.SUPPRESS)
    add("--deadline-s", type=float, default=None, help=argparse.SUPPRESS)
    add("--platform", default="unknown", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parent: runs the sections, writes the report and prints it. Child (--section): one section."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.section:
        return run_section(args)
    names = args.sections.split(",") if args.sections else list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {', '.join(BY_NAME)}")
    # The probe always runs first when anything else does: the kernel tests need its platform.
    sections = [s for s in SECTIONS if s.name in names or s.name == "probe"]
    out_dir = os.path.abspath(args.out)
    report = run_all(sections, child_argv(args), header(args, argv), args.budget, out_dir)
    print(gpu_report.write(report, out_dir), flush=True)
    print(f"written: {os.path.join(out_dir, gpu_report.MARKDOWN_NAME)}, "
          f"{os.path.join(out_dir, gpu_report.JSON_NAME)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
