"""The one training loop: config -> mesh -> data -> state -> jitted step -> loop -> final eval."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlm_jax import evals, models, tasks
from vlm_jax.layers import lora
from vlm_jax.parallel import hosts
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.parallel.rules import as_rules, mesh_shardings
from vlm_jax.paths import local_dir
from vlm_jax.train import optim
from vlm_jax.train import state as state_lib
from vlm_jax.train.checkpoint import Checkpointer
from vlm_jax.train.metrics import MetricWriter, Progress

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient too many steps in a row."""


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh, rules: Any):
    """Mesh + logical axis rules, so the models' logical constraints resolve while tracing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(as_rules(rules)):
        yield


class _Preemption:
    """Turns SIGTERM into a flag the loop polls: save, then exit cleanly.

    On several hosts the loop does not act on its own flag but on hosts.AnyHost's vote over all
    of them, so a SIGTERM to any one host makes every host save the same step and stop.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # Not the main thread: leave signals alone.
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _NonFiniteGuard:
    """Reports steps whose update was skipped for a non-finite loss or gradient; raises after `limit`
    in a row."""

    def __init__(self, limit: int, verbose: bool):
        self.limit, self.verbose = limit, verbose
        self.in_a_row = 0
        self._pending: tuple[int, dict] | None = None

    def observe(self, step: int, metrics: dict) -> None:
        """Queues this step's metrics and checks the previously queued ones."""
        self.flush()
        self._pending = (step, metrics)

    def flush(self) -> None:
        """Checks the queued step (blocks until it has run)."""
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        if bool(metrics["finite"]):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        message = (
            f"step {step}: non-finite loss or gradient (loss {float(metrics['loss'])}, gradient norm "
            f"{float(metrics['grad_norm'])}); update skipped"
        )
        log.warning(message)
        if self.verbose:
            print(message, flush=True)
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"non-finite loss or gradient at steps {step - self.in_a_row + 1}..{step}; the state keeps its "
                "last finite value"
            )


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def state_initializer(
    model: nn.Module, task: Any, tx: Any, example_batch: dict, mesh: jax.sharding.Mesh, rules: Any
) -> tuple[Any, Any, Any]:
    """(init(rng) -> boxed state, state shardings, abstract state with shardings) for a batch shape."""
    example = {k: jnp.zeros(np.shape(v), np.asarray(v).dtype) for k, v in example_batch.items()}
    init = functools.partial(state_lib.init_state, model, tx, inputs=task.model_inputs(example))
    # Traced without the mesh: flax would otherwise constrain DenseGeneral kernels while they are
    # still flat. The out_shardings below place the state.
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = mesh_shardings(boxed, mesh, rules)
    return init, shardings, _with_shardings(nn.meta.unbox(boxed), shardings)


def jit_train_step(
    model: nn.Module,
    task: Any,
    tx: Any,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    state_shardings: Any,
    batch_shardings: Any,
):
    """The jitted (state, batch, rng) -> (state, metrics) with explicit shardings; state donated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step_fn = state_lib.make_train_step(model, task.loss_fn, tx, config)
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


def checkpoint_view(trainable: Any, state: dict) -> dict:
    """The part of the state a checkpoint holds: all of it, or only the trained params (frozen ones
    are restored from their source instead of being stored again with every run)."""
    if trainable is None:
        return state
    return {**state, "params": lora.subset(state["params"], trainable(state["params"]))}


def init_from_map(config: ml_collections.ConfigDict) -> dict[str, str]:
    """config.train.init_from_map 'ours:theirs,...' -> {ours: theirs} (top-level param names;
    theirs "." is the source's whole tree, e.g. 'tokenizer:.' puts a tokenizer run's params, and
    its model state, under our `tokenizer`)."""
    return parse_param_map(str(config.train.get("init_from_map", "") or ""))


def parse_param_map(spec: str) -> dict[str, str]:
    """'ours:theirs,...' -> {ours: theirs}."""
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        ours, sep, theirs = item.partition(":")
        if not sep or not ours or not theirs:
            raise ValueError(f"train.init_from_map item {item!r}: write 'ours:theirs' (theirs '.': their whole tree)")
        out[ours] = theirs
    return out


def _mapped(source: str, mapping: dict[str, str], abstract: Any, key: str = "params") -> dict[str, Any]:
    """{ours: the source's tree `theirs` (or its whole tree for ".")} restored as abstract[ours]."""
    from vlm_jax.train.checkpoint import restore_params

    out = {}
    for ours, theirs in mapping.items():
        if theirs == ".":
            out[ours] = _whole_params(source, abstract[ours]) if key == "params" else restore_params(
                source, abstract[ours], key=key)
        else:
            out[ours] = restore_params(source, {theirs: abstract[ours]}, key=key)[theirs]
    return out


def _whole_params(source: str, abstract: Any) -> Any:
    """A run's whole params tree. A run with frozen params (optim.trainable, LoRA) checkpoints only
    the trained ones; the frozen ones come from its own init_from / init_also, as when it resumes
    (recursively: e.g. a diffusion upsampler's base, a diffusion run whose text tower came from a
    CLIP run). ValueError for frozen params that came from the run's seed (in no checkpoint)."""
    from vlm_jax import config as config_lib
    from vlm_jax.train.checkpoint import restore_params

    path = os.path.join(source, "config.json")
    if not os.path.isfile(path):
        return restore_params(source, abstract)
    with open(path) as f:
        theirs = config_lib.from_json(f.read())
    trainable = optim.trainable_fn(theirs) if "optim" in theirs else None
    if trainable is None or not os.path.isdir(os.path.join(source, "checkpoints")):
        return restore_params(source, abstract)
    stored = restore_params(source, lora.subset(abstract, trainable(abstract)))
    try:
        return complete_params(theirs, abstract, stored)
    except FrozenFromSeedError as e:
        raise ValueError(f"init_from {source!r}: its frozen params {e.paths[:5]} came from its seed, not from a "
                         "checkpoint, so they cannot be loaded from it") from e


class FrozenFromSeedError(ValueError):
    """complete_params without `fresh`: some frozen params came from the run's seed."""

    def __init__(self, paths: list[str]):
        super().__init__(f"frozen params from the seed, in no checkpoint: {paths[:5]}")
        self.paths = paths


def complete_params(config: ml_collections.ConfigDict, abstract: Any, stored: Any,
                    fresh: Any = None) -> Any:
    """The whole params of a run whose checkpoint holds only its trained ones (`stored`, a subset of
    `abstract`, the model's ShapeDtypeStruct tree): the frozen ones from the run's own init_from /
    init_also sources (as when it resumes), and only those that came from its seed from fresh()
    (the seed's init, the trainer's rng), so a model whose frozen parts all come from checkpoints
    (a LLaVA's LLM, an upsampler's base) is never randomly initialised first.
    FrozenFromSeedError when some are left and fresh is None."""
    params = lora.overlay(initial_params(config, abstract, abstract), stored)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    unset = [jax.tree_util.keystr(p) for p, leaf in leaves if isinstance(leaf, jax.ShapeDtypeStruct)]
    if not unset:
        return params
    if fresh is None:
        raise FrozenFromSeedError(unset)
    new = fresh()
    return jax.tree.map(lambda p, f: f if isinstance(p, jax.ShapeDtypeStruct) else p, params, new)


def init_also(config: ml_collections.ConfigDict) -> list[tuple[str, dict[str, str]]]:
    """config.train.init_also ('SOURCE=ours:theirs,...', ...) -> [(source, {ours: theirs})]."""
    out = []
    for entry in config.train.get("init_also", ()) or ():
        source, sep, spec = str(entry).partition("=")
        if not sep or not source.strip() or not spec.strip():
            raise ValueError(f"train.init_also entry {entry!r}: write 'SOURCE=ours:theirs,...'")
        if source.strip().startswith("stage:"):
            raise ValueError(f"train.init_also entry {entry!r} names a stage: only a run of stages "
                             "(config.stages) resolves 'stage:<name>'; give a run's workdir instead")
        out.append((source.strip(), parse_param_map(spec)))
    return out


def initial_params(config: ml_collections.ConfigDict, params: Any, abstract_params: Any) -> Any:
    """Fresh params, with those that config.train.init_from has (another run's latest checkpoint
    or a converted model) loaded over them, then train.init_also's. LoRA adapters, which a base
    model lacks, stay fresh."""
    params = _initial_params(config, params, abstract_params)
    for source, mapping in init_also(config):
        missing = [ours for ours in mapping if ours not in abstract_params]
        if missing:
            raise ValueError(f"train.init_also {source}: names params the model lacks: {missing}")
        params = {**params, **_mapped(source, mapping, abstract_params)}
        log.info("initialised %s from %s", ", ".join(f"{o} <- {t}" for o, t in mapping.items()), source)
    return params


def _initial_params(config: ml_collections.ConfigDict, params: Any, abstract_params: Any) -> Any:
    source = str(config.train.get("init_from", "") or "")
    if not source:
        return params
    from vlm_jax.train.checkpoint import restore_params

    mapping = init_from_map(config)
    if mapping:
        missing = [ours for ours in mapping if ours not in abstract_params]
        if missing:
            raise ValueError(f"train.init_from_map names params the model lacks: {missing}")
        loaded = _mapped(source, mapping, abstract_params)
        log.info("initialised %s from %s", ", ".join(f"{o} <- {t}" for o, t in mapping.items()), source)
        return {**params, **loaded}
    base = lambda tree: lora.subset(tree, jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: not lora.is_adapter(path), tree))
    loaded = restore_params(source, base(abstract_params))
    log.info("initialised params from %s", source)
    return lora.overlay(params, loaded)


def initial_model_state(config: ml_collections.ConfigDict, model_state: dict, abstract: dict) -> dict:
    """Fresh model state, with the statistics (BatchNorm's, a VQ codebook's EMA) of the params
    that init_from_map loads whole ("ours:.") taken from the source's model state as well."""
    source = str(config.train.get("init_from", "") or "")
    whole = {ours: "." for ours, theirs in init_from_map(config).items() if theirs == "."}
    if not source or not whole or not model_state:
        return model_state
    out = dict(model_state)
    for collection, tree in model_state.items():
        mapping = {ours: "." for ours in whole if ours in tree}
        if mapping:
            loaded = _mapped(source, mapping, {o: {collection: abstract[collection][o]} for o in mapping},
                             key="model_state")
            out[collection] = {**tree, **{o: loaded[o][collection] for o in mapping}}
    return out


def load_state(
    config: ml_collections.ConfigDict, checkpointer: Checkpointer, step: int | None, init: Any,
    shardings: Any, abstract: Any, rng: jax.Array,
) -> tuple[dict, dict | None]:
    """(state, data_state): the checkpoint at `step`, or a fresh state (init_from applied) when step
    is None. A checkpoint without the frozen params gets them from init_from / the seed."""
    trainable = optim.trainable_fn(config)
    state = None
    if step is None or trainable is not None:
        state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
        state["params"] = initial_params(config, state["params"], abstract["params"])
        if step is None:
            state["model_state"] = initial_model_state(config, state["model_state"], abstract["model_state"])
    if step is None:
        return state, None
    restored, data_state = checkpointer.restore(step, checkpoint_view(trainable, abstract))
    if state is not None:
        restored = {**restored, "params": lora.overlay(state["params"], restored["params"])}
    return restored, data_state


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_at_step: int | None = None,
    devices: list | None = None,
) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`. Returns a summary with the final metrics.

    stop_at_step: save and return once this step is reached (as a preemption would).
    devices: the devices of the mesh (default: all).

    On several hosts (vlm_jax.parallel.distributed.initialize() first; `vlm-jax train` does),
    every host calls this with the same arguments: each reads its own share of the data and keeps
    its own iterator state in the checkpoints, host 0 writes metrics, and SIGTERM on any host
    stops all of them at the same step.
    """
    # SIGTERM from here on means "save and stop", even while still compiling.
    with _Preemption() as preemption:
        return _train(config, workdir, preemption, stop_at_step, devices)


def _train(config, workdir, preemption, stop_at_step, devices) -> dict[str, Any]:
    workdir = local_dir(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = hosts.is_main_process()
    mesh = make_mesh(config.mesh, devices)
    rules = config.sharding_rules
    total_steps = int(config.train.steps)

    # Data and tokenizer.
    from vlm_jax.data import pipeline, tokenizer as tokenizer_lib

    def tokenizer_and_batches():
        tokenizer = tokenizer_lib.load_or_train(config, workdir)
        return tokenizer, pipeline.train_batches(
            config, tokenizer, process_index=hosts.process_index(), process_count=hosts.process_count()
        )

    # Host 0 first: it trains the tokenizer into the workdir and builds a dataset cache (tfds)
    # that the run lacks; then the other hosts load them instead of writing the same files.
    if is_main:
        tokenizer, batches = tokenizer_and_batches()
    hosts.barrier("vlm_jax:tokenizer_and_data")
    if not is_main:
        tokenizer, batches = tokenizer_and_batches()
    first_local = next(batches)  # Also fixes the batch shapes the step is compiled for.
    batch_shardings = hosts.batch_shardings(first_local, mesh, rules)

    # Model, optimiser and the sharded state.
    model = models.build(config)
    task = tasks.get(config.task.name)
    trainable = optim.trainable_fn(config)
    tx = optim.make_optimizer(config.optim, total_steps, trainable)
    init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    init, shardings, abstract = state_initializer(model, task, tx, first_local, mesh, rules)
    # With frozen params (LoRA, optim.trainable) checkpoints hold only the trained ones; the
    # frozen ones come back from init_from (or the seed) on resume.
    view = functools.partial(checkpoint_view, trainable)

    checkpointer = Checkpointer(
        workdir, keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoints
    )
    start = checkpointer.latest_step()
    state, data_state = load_state(config, checkpointer, start, init, shardings, abstract, init_rng)
    if start is not None:
        # Each host resumes its own iterator: the checkpoint holds one state per host.
        batches.set_state(hosts.own_data_state(data_state))
        first_local = None
        log.info("resumed from step %d in %s", start, checkpointer.directory)
    else:
        start = 0

    train_step = jit_train_step(model, task, tx, config, mesh, shardings, batch_shardings)

    evaluators = evals.build(config, model, tokenizer, mesh, workdir=workdir)
    writer = MetricWriter(workdir, enabled=is_main)
    if is_main and start == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    progress = Progress(
        total_steps, start, config.data.batch_size, enabled=is_main and config.train.progress
    )

    def run_evals(step: int) -> dict[str, float]:
        results = {}
        with sharding_context(mesh, rules):
            for evaluator in evaluators:
                results.update(evaluator(state["params"], state["model_state"]))
                if hasattr(evaluator, "samples"):  # generations: written beside the metrics
                    writer.write_samples(step, evaluator.name, evaluator.samples())
                if hasattr(evaluator, "write_grid") and is_main:  # drawn images: a PNG grid beside them
                    evaluator.write_grid(writer.samples_dir, step)
        if results:
            writer.write(step, results)
        return results

    def save(step: int, force: bool = False) -> None:
        # Every host takes part (Orbax writes each host's shards); the data item holds the
        # iterator state of every host, gathered from all of them.
        data_state = hosts.data_state_for_checkpoint(batches.get_state())
        checkpointer.save(step, view(state), data_state, config, force=force)

    step, eval_results, train_metrics = start, {}, {}
    nonfinite = _NonFiniteGuard(int(config.train.get("max_nonfinite_steps", 5)), is_main)
    lr_schedule = optim.learning_rate_schedule(config.optim, total_steps)
    t_log, step_log = time.perf_counter(), start
    preempted = False
    # SIGTERM on any host stops all hosts at the same step (one tiny all-reduce per step).
    any_host_preempted = hosts.AnyHost(mesh.devices.flat)
    try:
        while step < total_steps:
            local = first_local if first_local is not None else next(batches)
            first_local = None
            batch = hosts.global_batch(local, batch_shardings)
            with sharding_context(mesh, rules):
                state, metrics = train_step(state, batch, step_rng)
            step += 1
            # Checks the previous step's verdict, so the host never waits on the step just queued.
            nonfinite.observe(step, metrics)
            progress.update(step, float(metrics["loss"]) if step % 10 == 0 else None)
            if step % config.train.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                rate = (step - step_log) / max(now - t_log, 1e-9)
                t_log, step_log = now, step
                train_metrics = {f"train/{k}": v for k, v in jax.device_get(metrics).items()}
                train_metrics.update(
                    {
                        "train/steps_per_sec": rate,
                        "train/examples_per_sec": rate * config.data.batch_size,
                        "train/lr": float(lr_schedule(step)),
                    }
                )
                train_metrics.update(hosts.summed_counts(batches.stats()))  # all hosts' reads
                writer.write(step, train_metrics)
            if evaluators and config.train.eval_every and step % config.train.eval_every == 0:
                if step != total_steps:
                    eval_results = run_evals(step)
            if step % config.train.ckpt_every == 0 and step != total_steps:
                save(step)
            if any_host_preempted.vote(preemption.requested) or (
                stop_at_step is not None and step >= stop_at_step
            ):
                preempted = True
                break
        nonfinite.flush()
        progress.close()
        if checkpointer.latest_step() != step:
            save(step, force=True)
        if not preempted or step == total_steps:
            eval_results = run_evals(step)
    finally:
        # Pending async saves finish, and files and workers close, even when the loop raised.
        checkpointer.close()
        writer.close()
        batches.close()
    return {
        "step": step,
        "finished": step >= total_steps,
        "preempted": preempted,
        "train": {k: float(np.asarray(v)) for k, v in train_metrics.items()},
        "eval": eval_results,
        "workdir": workdir,
        "metrics_path": writer.jsonl_path,
        "tensorboard_dir": writer.tensorboard_dir,
        "checkpoint_dir": checkpointer.directory,
    }
