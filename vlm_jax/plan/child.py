"""The plan's child process: a fresh `python -m vlm_jax.plan` with fake CPU devices.

A mesh of N devices needs N devices in the process, and XLA's CPU backend makes N only when
XLA_FLAGS=--xla_force_host_platform_device_count=N is set before jax starts its backends. So
where this process has fewer devices than the mesh, plan() runs in a child started with that flag
(the command line always starts it); the child's progress lines are passed on, and XLA's own log
lines counted (shown with VLM_JAX_PLAN_XLA_LOGS=1).
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
from typing import Any

from vlm_jax.plan.collectives import show_xla_logs
from vlm_jax.plan.devices import Device

CHILD_ENV = "VLM_JAX_PLAN_CHILD"


def _child_env(num_devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[CHILD_ENV] = "1"
    return env


def plan_in_subprocess(config, mesh_cfg: dict[str, int], device: Device, **kwargs) -> dict[str, Any]:
    """plan() in a fresh `python -m vlm_jax.plan` with as many fake CPU devices as the mesh has."""
    with tempfile.TemporaryDirectory(prefix="vlm_jax_plan_") as tmp:
        job = os.path.join(tmp, "job.pkl")
        out = os.path.join(tmp, "plan.json")
        with open(job, "wb") as f:
            pickle.dump(dict(config=config, mesh=mesh_cfg, device=device, kwargs=kwargs), f)
        cmd = [sys.executable, "-m", "vlm_jax.plan", "--job", job, "--json", out]
        proc = subprocess.Popen(cmd, env=_child_env(math.prod(mesh_cfg.values())), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        # The child's progress lines pass through; XLA's own log lines (the SPMD partitioner's
        # warnings, say) only with VLM_JAX_PLAN_XLA_LOGS=1, else they are counted.
        show_all = show_xla_logs()
        tail: collections.deque[str] = collections.deque(maxlen=200)
        hidden = 0
        for line in proc.stderr:
            tail.append(line)
            if kwargs.get("verbose") and (show_all or line.startswith("[plan]")):
                sys.stderr.write(line)
                sys.stderr.flush()
            elif not line.startswith("[plan]"):
                hidden += 1
        code = proc.wait()
        if code != 0 or not os.path.exists(out):
            raise RuntimeError(f"plan child failed (exit {code}):\n{''.join(tail)[-6000:]}")
        if hidden and kwargs.get("verbose"):
            print(f"[plan] {hidden} lines of XLA's log hidden (VLM_JAX_PLAN_XLA_LOGS=1 shows them)",
                  file=sys.stderr, flush=True)
        with open(out) as f:
            return json.load(f)
