"""The GPU report's kernel-test section: `pytest -m gpu tests/kernels` in a subprocess of the
repository checkout, counted from its JUnit XML.

`-n 0`: two xdist workers would each preallocate 75% of the GPU. tests/conftest.py defaults
JAX_PLATFORMS to cpu (for the CPU suite), so on a GPU the run sets JAX_PLATFORMS=cuda, or every
GPU test would skip itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from typing import Any

import vlm_jax

KERNEL_TESTS = os.path.join("tests", "kernels")
# Time left to the section after pytest's own timeout, to count and report.
REPORT_MARGIN_S = 10.0
TAIL_CHARS = 3000


def repo_root() -> str | None:
    """The checkout holding tests/kernels: the current folder, or the one beside the package."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(vlm_jax.__file__)))
    for root in (os.getcwd(), package_parent):
        if os.path.isdir(os.path.join(root, KERNEL_TESTS)):
            return root
    return None


def pytest_command(junit_path: str) -> list[str]:
    """The pytest command line (run in the repository root)."""
    return [sys.executable, "-m", "pytest", "-m", "gpu", KERNEL_TESTS, "-q", "-n", "0", "-p", "no:cacheprovider",
            "-rfEs", f"--junitxml={junit_path}"]


def parse_junit(path: str) -> dict[str, Any]:
    """{'passed', 'failed', 'errors', 'skipped', 'failing': [test ids], 'skip_reasons': [...]}."""
    counts: dict[str, Any] = dict(passed=0, failed=0, errors=0, skipped=0, failing=[], skip_reasons=[])
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[child.tag]
                message = " ".join((child.get("message") or "").split())[:200]
                if outcome == "skipped":
                    if message not in counts["skip_reasons"]:
                        counts["skip_reasons"].append(message)
                else:
                    counts["failing"].append(f"{test_id} ({outcome}: {message})")
                break
        counts[outcome] += 1
    return counts


def kernel_tests(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the GPU kernel tests; {"section_skipped": why} when there is no tests/ folder."""
    root = repo_root()
    if root is None:
        return dict(section_skipped=f"no {KERNEL_TESTS} folder in {os.getcwd()} or beside the package (installed from a "
                            "wheel outside the repository): run from the repository root to include the tests")
    env = dict(os.environ)
    # Without the probe's answer, an NVIDIA driver is the next best sign of a GPU.
    if args.platform == "gpu" or (args.platform == "unknown" and shutil.which("nvidia-smi")):
        env["JAX_PLATFORMS"] = "cuda"
    timeout = max(args.deadline_s - REPORT_MARGIN_S, 1.0) if args.deadline_s else None
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        command = pytest_command(junit)
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            return dict(timed_out=True, timeout_s=timeout, command=" ".join(command[1:]),
                        output_tail=out[-TAIL_CHARS:], platform=env.get("JAX_PLATFORMS"))
        seconds = time.perf_counter() - start
        counts = parse_junit(junit) if os.path.exists(junit) else None
    output = proc.stdout + proc.stderr
    return dict(counts or {}, returncode=proc.returncode, seconds=seconds, command=" ".join(command[1:]),
                root=root, jax_platforms=env.get("JAX_PLATFORMS"), no_junit=counts is None,
                output_tail=output[-TAIL_CHARS:])
