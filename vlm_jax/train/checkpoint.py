"""Orbax checkpoints of the train state, the data-iterator state and the config."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from vlm_jax import config as config_lib
from vlm_jax.paths import local_dir


class CheckpointMismatchError(ValueError):
    """A checkpoint whose arrays do not fit the model being restored."""


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    """Leaves keyed by 'a/b/0/mu' paths, so stored metadata (dicts and lists, as Orbax writes
    namedtuples and tuples) and the live state (optax namedtuples) compare equal."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in flat}


class Checkpointer:
    """Keeps the last N checkpoints of a run under <workdir>/checkpoints (async saves)."""

    def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.join(local_dir(workdir), "checkpoints")
        self._manager = ocp.CheckpointManager(
            self.directory,
            # Named handlers let a fresh process read the metadata of an existing checkpoint.
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        """The newest saved step, or None when the run has no checkpoint yet."""
        return self._manager.latest_step()

    def save(
        self, step: int, state: Any, data_state: dict, config: ml_collections.ConfigDict, *, force: bool = False
    ) -> bool:
        """Starts saving (asynchronously) state, data-iterator state and config at `step`."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config_lib.from_json(config_lib.to_json(config)).to_dict()),
            ),
            force=force,
        )

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        stored = self._manager.item_metadata(step)["state"]
        stored = getattr(stored, "tree", stored)
        if stored is None:
            raise CheckpointMismatchError(f"checkpoint {self.directory}/{step} has no readable state")
        want = _leaves_by_path(abstract_state)
        have = _leaves_by_path(stored)
        problems = []
        for name, leaf in want.items():
            got = have.pop(name, None)
            if got is None:
                problems.append(f"{name}: missing from the checkpoint")
            elif tuple(got.shape) != tuple(leaf.shape):
                problems.append(f"{name}: checkpoint {tuple(got.shape)} vs model {tuple(leaf.shape)}")
        problems += [f"{name}: in the checkpoint, not in the model" for name in have]
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not fit this model:\n  {shown}{more}"
            )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state, data_state) at `step`, laid out as the abstract state's shardings."""
        self._check_shapes(step, abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"]

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        """The config a checkpoint was saved with."""
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return ml_collections.ConfigDict(restored["config"])

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def _params_location(source: str, step: int | None = None) -> tuple[str, int | None]:
    """(directory of a PyTree checkpoint whose tree has 'params', step) for init_from's forms:
    a run's workdir (its checkpoint at `step`, default the latest) or a converted model."""
    source = local_dir(source, "init_from")
    if os.path.isdir(os.path.join(source, "params")) and not os.path.isdir(os.path.join(source, "checkpoints")):
        return os.path.join(source, "params"), None  # `vlm-jax convert` output: the params tree itself
    directory = source if os.path.basename(source) == "checkpoints" else os.path.join(source, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"init_from {source!r}: neither a run's workdir (with checkpoints/) nor a converted model (with params/)"
        )
    steps = ocp.utils.checkpoint_steps(directory)
    if not steps:
        raise FileNotFoundError(f"init_from {source!r}: no checkpoint in {directory}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(f"{source!r} has no checkpoint at step {step} (it has {sorted(steps)})")
    return os.path.join(directory, str(step), "state"), step


def restore_params(source: str, abstract_params: Any, *, step: int | None = None, key: str = "params") -> Any:
    """The params of a run's checkpoint at `step` (default: the latest), or of a converted model,
    that the abstract params tree names, laid out as its shardings. Every named leaf must exist
    with the same shape; leaves of the source that are not named are left on disk. key: the part
    of a run's saved state to read ("params", or e.g. "model_state" for BatchNorm statistics)."""
    path, step = _params_location(source, step)
    handler = ocp.PyTreeCheckpointHandler()
    stored = handler.metadata(epath_of(path))
    stored = getattr(stored, "tree", stored)
    if step is not None:
        stored = stored.get(key) if isinstance(stored, dict) else None
        if stored is None:
            raise CheckpointMismatchError(f"init_from {source!r}: the checkpoint's state has no {key}")
    have = _leaves_by_path(stored)
    problems = []
    for name, leaf in _leaves_by_path(abstract_params).items():
        got = have.get(name)
        if got is None:
            problems.append(f"{name}: missing from {source}")
        elif tuple(got.shape) != tuple(leaf.shape):
            problems.append(f"{name}: {source} has {tuple(got.shape)}, the model {tuple(leaf.shape)}")
    if problems:
        shown = "\n  ".join(problems[:20])
        raise CheckpointMismatchError(f"init_from {source!r} does not fit this model:\n  {shown}")
    item = abstract_params if step is None else {key: abstract_params}
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=getattr(a, "sharding", None), dtype=a.dtype), item
    )
    restored = ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)
    )
    return restored if step is None else restored[key]


def epath_of(path: str) -> Any:
    """An etils path (what Orbax handlers take) for a local directory."""
    from etils import epath

    return epath.Path(path)
