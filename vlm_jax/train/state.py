"""The train state (a plain pytree) and the train step that updates it."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax


def init_state(
    model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, inputs: tuple
) -> dict:
    """{'params', 'opt_state', 'step', 'model_state'} from model.init on example inputs.

    Params (and so the optimiser moments made from them) keep their nn.Partitioned boxes, so the
    caller can read every leaf's logical axes off the abstract tree before unboxing.
    """
    variables = model.init({"params": rng, "dropout": rng}, *inputs, train=False)
    variables = dict(variables)
    params = variables.pop("params")
    opt_state = tx.init(params)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.zeros((), jnp.int32),
        "model_state": variables,
    }


def _split_micro(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def make_train_step(
    model: nn.Module,
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
) -> Callable[[dict, dict, jax.Array], tuple[dict, dict]]:
    """(state, batch, base_rng) -> (state, metrics); accumulates over config.optim.accum_steps.

    A non-finite loss or gradient leaves the state unchanged (metrics['finite'] = 0) so the host
    can report the step instead of training on.
    """
    accum = int(config.optim.accum_steps)
    from vlm_jax.train.optim import trainable_fn

    trainable = trainable_fn(config)
    # A loss that anneals something over training (a Gumbel temperature, a KL weight) declares a
    # keyword `step`: it gets the state's step (int32 scalar, the same for every micro-batch).
    takes_step = "step" in inspect.signature(loss_fn).parameters

    def grads_of(params, model_state, batch, rng, step):
        def f(p):
            extra = {"step": step} if takes_step else {}
            return loss_fn(model, p, batch, rng, config, model_state, **extra)

        (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(params)
        return loss, aux, grads

    def step(state, batch, base_rng):
        rng = jax.random.fold_in(base_rng, state["step"])
        params = state["params"]
        if accum == 1:
            loss, aux, grads = grads_of(params, state["model_state"], batch, rng, state["step"])
            metrics, model_state = aux["metrics"], aux["model_state"]
        else:
            micro = _split_micro(batch, accum)

            def body(carry, xs):
                grads_sum, model_state = carry
                mb, i = xs
                loss, aux, grads = grads_of(
                    params, model_state, mb, jax.random.fold_in(rng, i), state["step"]
                )
                grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
                return (grads_sum, aux["model_state"]), (loss, aux["metrics"])

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, model_state), (losses, metrics) = jax.lax.scan(
                body, (zeros, state["model_state"]), (micro, jnp.arange(accum))
            )
            grads = jax.tree.map(lambda g: g / accum, grads)
            loss = losses.mean()
            metrics = jax.tree.map(jnp.mean, metrics)
        if trainable is not None:
            # Frozen params' gradients are never used, so XLA drops their computation.
            grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable(grads))
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "model_state": model_state,
        }
        # Keep the old values (but count the step) when the update is not finite.
        kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        kept["step"] = state["step"] + 1
        metrics = dict(metrics, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
        return kept, metrics

    return step
