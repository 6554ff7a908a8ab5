"""Evaluating a run's latest checkpoint with the evaluators of its config."""

from __future__ import annotations

import jax
import ml_collections

from vlm_jax import evals, models, tasks
from vlm_jax.parallel import hosts
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.paths import local_dir
from vlm_jax.train import optim
from vlm_jax.train.checkpoint import Checkpointer
from vlm_jax.train.trainer import load_state, sharding_context, state_initializer


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, step: int | None = None) -> dict:
    """Metrics of config.evals on the checkpoint at `step` (default: the latest) in workdir."""
    from vlm_jax.data import pipeline, tokenizer as tokenizer_lib

    workdir = local_dir(workdir)
    checkpointer = Checkpointer(workdir, async_save=False)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
    mesh = make_mesh(config.mesh)
    tokenizer = tokenizer_lib.load_or_train(config, workdir)
    batches = pipeline.train_batches(
        config, tokenizer, process_index=hosts.process_index(), process_count=hosts.process_count()
    )
    model = models.build(config)
    tx = optim.make_optimizer(config.optim, int(config.train.steps), optim.trainable_fn(config))
    task = tasks.get(config.task.name)
    with batches:  # Only its first batch's shapes are needed.
        example = next(batches)
    init, shardings, abstract = state_initializer(model, task, tx, example, mesh, config.sharding_rules)
    rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]  # the trainer's init rng
    state, _ = load_state(config, checkpointer, step, init, shardings, abstract, rng)
    checkpointer.close()
    results = {}
    with sharding_context(mesh, config.sharding_rules):
        for evaluator in evals.build(config, model, tokenizer, mesh, workdir=workdir):
            results.update(evaluator(state["params"], state["model_state"]))
    return {"step": step, "eval": results}
