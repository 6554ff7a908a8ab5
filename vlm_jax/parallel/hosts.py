"""Multi-host helpers: each host feeds its own slice of the batch into one global jax.Array."""

from __future__ import annotations

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
