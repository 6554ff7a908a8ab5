"""Multi-host helpers: each host feeds its own slice of the batch into one global jax.Array, keeps
its own data-iterator state in the checkpoints, and the hosts agree on when to stop (AnyHost)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from vlm_jax.parallel.rules import batch_sharding


def process_index() -> int:
    """This host's index in the run (0 on a single host)."""
    return jax.process_index()


def process_count() -> int:
    """Number of hosts in the run."""
    return jax.process_count()


def is_main_process() -> bool:
    """True on the host that writes logs and metrics."""
    return jax.process_index() == 0


def global_batch(local: Mapping[str, np.ndarray], shardings: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Host-local numpy batch [b_local, ...] -> global jax.Arrays [b_local * hosts, ...].

    shardings: from batch_shardings(), computed once per run rather than per batch.
    """
    return {
        key: jax.make_array_from_process_local_data(shardings[key], np.asarray(value))
        for key, value in local.items()
    }


def batch_shardings(example: Mapping[str, np.ndarray], mesh: Mesh, rules: Any) -> dict:
    """The input sharding of each batch entry (leading dim over the 'batch' mesh axes)."""
    return {k: batch_sharding(mesh, rules, np.ndim(v)) for k, v in example.items()}


def fetch(tree: Any) -> Any:
    """jax.device_get that also takes arrays split across hosts (gathered whole on every host; a
    collective there, so every process must call it at the same point)."""

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(one, tree)


def barrier(name: str) -> None:
    """Waits until every host got here (no-op on a single host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather_json(obj: Any) -> list[Any]:
    """[obj of host 0, obj of host 1, ...] on every host, for small JSON-able objects."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    # Padded to a multiple of 4 KiB, so the gather compiles once for most state sizes.
    padded = np.zeros(-(-int(lengths.max()) // 4096) * 4096, np.uint8)
    padded[: len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]


def summed_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """Counters summed over hosts, each of which counts what it read (examples seen, skipped);
    every host calls this at the same point (a collective on several hosts)."""
    if jax.process_count() == 1:
        return dict(counts)
    from jax.experimental import multihost_utils

    keys = sorted(counts)
    rows = np.asarray(multihost_utils.process_allgather(np.asarray([counts[k] for k in keys], np.int32)))
    return dict(zip(keys, (int(x) for x in rows.reshape(-1, len(keys)).astype(np.int64).sum(axis=0))))


# A checkpoint's data item: one iterator state per host (each host reads its own share of the data).
_PER_HOST = "per_host"


def data_state_for_checkpoint(local_state: dict) -> dict:
    """The data item of a checkpoint: this host's iterator state on one host (as always), and the
    states of all hosts, gathered to every host, on several (Orbax writes JSON from host 0 only)."""
    if jax.process_count() == 1:
        return local_state
    return {_PER_HOST: allgather_json(local_state), "process_count": jax.process_count()}


def own_data_state(saved: dict | None) -> dict | None:
    """This host's iterator state from a checkpoint's data item.

    A checkpoint saved with another number of hosts gives host 0's state to every host: the
    iterators then warn and keep the global number of examples consumed, approximately.
    """
    if not saved or _PER_HOST not in saved:
        return saved
    states = saved[_PER_HOST]
    index = jax.process_index() if len(states) == jax.process_count() else 0
    return states[index]


class AnyHost:
    """Agreement on a per-host flag (here: "SIGTERM arrived"): every host learns whether any
    host raised it, at the same step.

    vote(flag) hands this step's flag to a tiny jitted max over all devices and returns the
    result of the previous step's vote, so the host never waits for the step just queued (the
    result it reads was dispatched a step earlier, right behind the previous train step). Cost:
    one int32 all-reduce per step, nothing on a single host (where the flag is returned at once).
    Every host must call vote() the same number of times.
    """

    def __init__(self, devices: Any):
        self._multi = jax.process_count() > 1
        self._pending = None
        if self._multi:
            import jax.numpy as jnp
            from jax.sharding import NamedSharding, PartitionSpec

            mesh = Mesh(np.asarray(list(devices), dtype=object), ("hosts",))
            self._sharding = NamedSharding(mesh, PartitionSpec("hosts"))
            self._size = mesh.size
            self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def vote(self, flag: bool) -> bool:
        """Any host's flag of the previous call (this call's flag, on a single host)."""
        if not self._multi:
            return bool(flag)
        value = np.int32(bool(flag))
        local = jax.make_array_from_callback(
            (self._size,), self._sharding, lambda index: np.full((1,), value, np.int32)
        )
        previous, self._pending = self._pending, self._max(local)
        return previous is not None and bool(int(previous))
