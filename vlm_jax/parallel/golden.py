"""What a config shards where: every param's shape and mesh PartitionSpec, computed without
allocating a single param (jax.eval_shape through the trainer's own `state_initializer`).

tests/parallel/test_golden_sharding.py compares these against checked-in snapshots
(tests/parallel/golden/<config>_<variant>.json), so a change in sharding shows up in review.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec

# The mesh the snapshots are taken on: every axis 2 wide, so a rule that moves a dim from one
# axis to another (or drops it) changes the snapshot.
GOLDEN_MESH = {"data": 2, "fsdp": 2, "tensor": 2}

# shape (as a list), mesh PartitionSpec (one entry per dim: None, an axis name, or a list of names)
Entry = tuple[list[int], list[Any]]


def example_batch(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """A batch of one with the shapes the config's data pipeline produces (param shapes depend on
    the image size and, for position embeddings, the text length, but not on the batch size)."""
    task = config.task.name
    if task == "lm":
        tokens = np.zeros((1, int(config.data.text_length)), np.int32)
        return {"tokens": tokens, "positions": tokens, "segment_ids": tokens}
    # Image tasks: an image, a caption and a label; each task's model_inputs takes what it reads.
    size = int(config.data.image_size)
    return {
        "image": np.zeros((1, size, size, 3), np.float32),
        "tokens": np.zeros((1, int(config.data.text_length)), np.int32),
        "label": np.zeros((1,), np.int32),
    }


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def spec_to_json(spec: PartitionSpec, ndim: int) -> list[Any]:
    """PartitionSpec -> JSON list with one entry per dim (trailing replicated dims written out)."""
    entries = list(spec) + [None] * (ndim - len(spec))
    return [list(e) if isinstance(e, tuple) else e for e in entries]


def state_shardings(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    """(abstract state with shardings, state shardings) exactly as the trainer computes them:
    models.build, tasks.get, optim.make_optimizer and trainer.state_initializer; nothing allocated.

    mesh: default make_mesh(config.mesh) (over the first devices when config.mesh has no -1).
    """
    from vlm_jax import models, tasks
    from vlm_jax.parallel.mesh import make_mesh
    from vlm_jax.train import optim
    from vlm_jax.train.trainer import state_initializer

    if mesh is None:
        sizes = [int(v) for v in config.mesh.values()]
        # A fully sized mesh takes the first devices it needs (a test may have more fake ones).
        devices = jax.devices()[: math.prod(sizes)] if all(s > 0 for s in sizes) else None
        mesh = make_mesh(config.mesh, devices)
    model = models.build(config)
    task = tasks.get(config.task.name)
    tx = optim.make_optimizer(config.optim, int(config.train.steps), optim.trainable_fn(config))
    _, shardings, abstract = state_initializer(
        model, task, tx, example_batch(config), mesh, config.sharding_rules
    )
    return abstract, shardings


def param_table(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> dict[str, Entry]:
    """'layers/attn/query/kernel' -> (shape, mesh spec) for every param; non-param collections
    (e.g. BatchNorm statistics) as 'model_state/<collection>/...'."""
    abstract, shardings = state_shardings(config, mesh)
    table = {}
    for part, prefix in (("params", ""), ("model_state", "model_state/")):
        leaves = jax.tree_util.tree_flatten_with_path(abstract[part])[0]
        for path, leaf in leaves:
            name = prefix + "/".join(_key_name(k) for k in path)
            spec = leaf.sharding.spec
            table[name] = (list(leaf.shape), spec_to_json(spec, len(leaf.shape)))
    del shardings
    return dict(sorted(table.items()))


def golden_config(spec: str) -> ml_collections.ConfigDict:
    """The config of `spec` with its own sharding rules on the golden (2, 2, 2) mesh."""
    from vlm_jax import config as config_lib

    return config_lib.load(spec, {f"mesh.{k}": v for k, v in GOLDEN_MESH.items()})


def to_json(table: Mapping[str, Entry]) -> str:
    """One param per line, so a diff in review shows exactly the params whose sharding moved."""
    lines = [f"  {json.dumps(name)}: {json.dumps([shape, spec])}" for name, (shape, spec) in table.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def from_json(text: str) -> dict[str, Entry]:
    """Inverse of to_json."""
    return {name: (shape, spec) for name, (shape, spec) in json.loads(text).items()}


def _fmt(entry: Entry | None) -> str:
    if entry is None:
        return "(absent)"
    shape, spec = entry
    return f"{tuple(shape)} P({', '.join(repr(tuple(s)) if isinstance(s, list) else repr(s) for s in spec)})"


def diff(expected: Mapping[str, Entry], actual: Mapping[str, Entry]) -> list[str]:
    """One line per param that was added, removed, reshaped or resharded."""
    lines = []
    for name in sorted(set(expected) | set(actual)):
        want, got = expected.get(name), actual.get(name)
        if want is not None:
            want = (list(want[0]), list(want[1]))
        if got is not None:
            got = (list(got[0]), list(got[1]))
        if want != got:
            lines.append(f"{name}: snapshot {_fmt(want)} -> now {_fmt(got)}")
    return lines


def sharded_fraction(table: Mapping[str, Entry], axis: str, itemsize: int = 4) -> float:
    """Fraction of the params' bytes split over mesh `axis` (params are float32 by default)."""
    total = sharded = 0
    for name, (shape, spec) in table.items():
        if name.startswith("model_state/"):
            continue
        size = math.prod(shape) * itemsize
        total += size
        if any(axis == s or (isinstance(s, list) and axis in s) for s in spec):
            sharded += size
    return sharded / max(total, 1)
