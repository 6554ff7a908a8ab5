"""Orbax checkpoints of the train state, the data-iterator state and the config."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from vlm_jax import config as config_lib


class CheckpointMismatchError(ValueError):
    """A checkpoint whose arrays do not fit the model being restored."""


class Checkpointer:
    """Keeps the last N checkpoints of a run under <workdir>/checkpoints (async saves)."""

    def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self._manager = ocp.CheckpointManager(
            self.directory,
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
        want = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
        have = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
        problems = []
        for path, leaf in want:
            name = jax.tree_util.keystr(path)
            got = have.pop(path, None)
            if got is None:
                problems.append(f"{name}: missing from the checkpoint")
            elif tuple(got.shape) != tuple(leaf.shape):
                problems.append(f"{name}: checkpoint {tuple(got.shape)} vs model {tuple(leaf.shape)}")
        problems += [f"{jax.tree_util.keystr(p)}: in the checkpoint, not in the model" for p in have]
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
