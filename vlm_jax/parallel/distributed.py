"""Joining a multi-host run: `jax.distributed.initialize` from flags, environment variables or the cluster.

A plain single-process run never calls it. It is called when

* flags or environment variables name the run (`--coordinator_address`, `--num_processes`,
  `--process_id` or VLM_JAX_COORDINATOR_ADDRESS, VLM_JAX_NUM_PROCESSES, VLM_JAX_PROCESS_ID), or
* a cluster that JAX detects by itself runs several processes: SLURM (srun with more than one
  task), a Cloud TPU pod (more than one TPU VM), Open MPI (mpirun with more than one rank), or
* VLM_JAX_DISTRIBUTED=1 forces JAX's auto-detection (Kubernetes, mpi4py, ...);
  VLM_JAX_DISTRIBUTED=0 turns all of this off.

Failures are bounded: a process that cannot reach the coordinator gives up after
`initialization_timeout` seconds (JAX aborts it: DEADLINE_EXCEEDED ... RegisterTask). Once the
run is up, a process that dies (stops sending heartbeats) makes JAX terminate every other process
after `heartbeat_timeout` seconds with "Terminating process because the JAX distributed service
detected fatal errors. This most likely indicates that another task died" (JAX aborts the process
from its own thread: no Python handler runs). A host that loses the coordinator (process 0)
fails at once.

On CPU the processes run their collectives through gloo, and `local_device_count` (or
XLA_FLAGS=--xla_force_host_platform_device_count=N) gives each process N fake devices.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)

# option -> environment variable (flags win over the environment).
ENV_VARS = {
    "coordinator_address": "VLM_JAX_COORDINATOR_ADDRESS",
    "num_processes": "VLM_JAX_NUM_PROCESSES",
    "process_id": "VLM_JAX_PROCESS_ID",
    "local_device_count": "VLM_JAX_LOCAL_DEVICE_COUNT",
    "initialization_timeout": "VLM_JAX_INITIALIZATION_TIMEOUT",
    "heartbeat_timeout": "VLM_JAX_HEARTBEAT_TIMEOUT",
    "shutdown_timeout": "VLM_JAX_SHUTDOWN_TIMEOUT",
    "mode": "VLM_JAX_DISTRIBUTED",
}


class DistributedError(RuntimeError):
    """The multi-host run could not be joined (bad settings, or the coordinator unreachable)."""


@dataclasses.dataclass
class Options:
    """How this process joins a run; None / defaults mean "detect" or "JAX's choice"."""

    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None
    local_device_count: int | None = None  # fake CPU devices per process (CPU only)
    initialization_timeout: int = 300  # seconds to wait for every process to join
    heartbeat_timeout: int = 60  # seconds without heartbeats before a process counts as dead
    shutdown_timeout: int = 120  # seconds the exit barrier waits for the other processes
    mode: str = "auto"  # auto | on | off (VLM_JAX_DISTRIBUTED=1 / 0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **flags) -> Options:
        """Options from the environment (VLM_JAX_*), with flags that are not None over them."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            value = flags.get(field.name)
            if value is None:
                value = environ.get(ENV_VARS[field.name]) or None
            if value is None:
                continue
            if field.name == "mode":
                value = {"1": "on", "true": "on", "0": "off", "false": "off"}.get(str(value).lower(), value)
                if value not in ("auto", "on", "off"):
                    raise DistributedError(f"{ENV_VARS['mode']}={value!r}: expected auto, 1 or 0")
            elif field.name != "coordinator_address":
                try:
                    value = int(value)
                except ValueError as e:
                    raise DistributedError(
                        f"{field.name} (or {ENV_VARS[field.name]}) must be an integer: {value!r}"
                    ) from e
            values[field.name] = value
        return cls(**values)

    @property
    def explicit(self) -> bool:
        """True when the coordinator, process count or process id were given."""
        return any(v is not None for v in (self.coordinator_address, self.num_processes, self.process_id))


def detected_cluster() -> str | None:
    """The cluster JAX would bootstrap from when it runs more than one process here, else None.

    SLURM, Open MPI and Cloud TPU pods; Kubernetes and mpi4py only through VLM_JAX_DISTRIBUTED=1.
    """
    try:
        from jax._src import clusters  # JAX's own detection (not a public API: guarded)

        kinds = list(clusters.ClusterEnv._cluster_types)
    except Exception:  # pragma: no cover - a JAX without it: SLURM by its variables
        n = os.environ.get("SLURM_NTASKS", "1")
        return "slurm" if "SLURM_PROCID" in os.environ and n.isdigit() and int(n) > 1 else None
    for kind in kinds:
        if kind.opt_in_only_method or kind.name in ("", "tpu"):  # mpi4py, k8s, the TPU base class
            continue
        try:
            if kind.is_env_present() and int(kind.get_process_count()) > 1:
                return kind.name
        except Exception as e:  # noqa: BLE001 - detection must never break a plain run
            log.debug("cluster detection %s failed: %s", kind.name, e)
    return None


def _use_local_device_count(count: int | None) -> None:
    import jax

    if count is not None:
        if count < 1:
            raise DistributedError(f"local_device_count must be positive, got {count}")
        jax.config.update("jax_num_cpu_devices", int(count))  # CPU only; ignored by GPU/TPU


def initialize(options: Options | None = None, *, verbose: bool = False) -> bool:
    """Joins the multi-host run the options, the environment or the cluster describe.

    Returns True when this process is part of a multi-process run (jax.distributed is up),
    False for a plain single-process run (nothing called). Must run before any JAX computation.
    verbose: say on stderr what it joins first (JAX aborts the process when that fails).
    """
    import jax

    options = Options.from_env() if options is None else options
    _use_local_device_count(options.local_device_count)
    if options.mode == "off":
        return False
    cluster = None
    if options.mode == "auto" and not options.explicit:
        cluster = detected_cluster()
        if cluster is None:
            return False
    if jax.distributed.is_initialized():
        return True
    # CPU processes exchange collectives over gloo (TCP); GPUs and TPUs ignore the setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # The trainer makes the hosts agree on preemption itself (SIGTERM -> a flag all-reduced every
    # step). JAX's preemption service would install a C++ SIGTERM handler of its own.
    jax.config.update("jax_enable_preemption_service", False)
    where = cluster or ("flags / environment" if options.explicit else "JAX's auto-detection")
    if verbose:
        print(
            f"vlm-jax: joining the multi-host run ({where}) at {options.coordinator_address or '(detected)'} "
            f"as process {'(detected)' if options.process_id is None else options.process_id} of "
            f"{'(detected)' if options.num_processes is None else options.num_processes}; waiting up to "
            f"{options.initialization_timeout} s for all processes", file=sys.stderr, flush=True,
        )
    try:
        jax.distributed.initialize(
            coordinator_address=options.coordinator_address,
            num_processes=options.num_processes,
            process_id=options.process_id,
            initialization_timeout=int(options.initialization_timeout),
            heartbeat_timeout_seconds=int(options.heartbeat_timeout),
            shutdown_timeout_seconds=int(options.shutdown_timeout),
        )
    except (ValueError, TypeError) as e:
        raise DistributedError(
            f"cannot join the multi-host run ({where}): {e}. Give all of --coordinator_address, "
            f"--num_processes and --process_id (or {ENV_VARS['coordinator_address']}, "
            f"{ENV_VARS['num_processes']}, {ENV_VARS['process_id']})"
        ) from e
    except Exception as e:  # JaxRuntimeError: coordinator unreachable, timed out, ...
        raise DistributedError(
            f"cannot join the multi-host run at {options.coordinator_address or '(detected)'} as process "
            f"{options.process_id} of {options.num_processes} ({where}) within "
            f"{options.initialization_timeout} s: {e}"
        ) from e
    log.info(
        "joined the multi-host run (%s) as process %d of %d, %d local devices", where,
        jax.process_index(), jax.process_count(), jax.local_device_count(),
    )
    return True


def shutdown() -> None:
    """Leaves the run cleanly (waits, at most shutdown_timeout, for the other processes)."""
    import jax

    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
