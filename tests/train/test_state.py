"""The train step's contract with a task's loss: the step reaches losses that ask for it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlm_jax.train.state import init_state, make_train_step


def _config(accum):
    return ml_collections.ConfigDict(dict(optim=dict(accum_steps=accum, trainable=""), model=dict()))


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(1)(x)


def _run(loss_fn, accum):
    model = _Linear()
    batch = {"x": jnp.ones((4, 3))}
    tx = optax.sgd(0.1)
    state = init_state(model, tx, jax.random.key(0), (batch["x"],))
    step = jax.jit(make_train_step(model, loss_fn, tx, _config(accum)))
    seen = []
    for _ in range(3):
        state, metrics = step(state, batch, jax.random.key(1))
        seen.append(float(metrics["seen_step"]))
    return seen


def test_a_loss_with_a_step_keyword_gets_the_train_step():
    def loss_fn(model, params, batch, rng, config, model_state, *, step):
        y = model.apply({"params": params}, batch["x"])
        loss = jnp.mean(y**2) * (1.0 + step)
        return loss, {"metrics": {"seen_step": step.astype(jnp.float32)}, "model_state": model_state}

    assert _run(loss_fn, 1) == [0.0, 1.0, 2.0]
    assert _run(loss_fn, 2) == [0.0, 1.0, 2.0]  # the same step for both micro-batches


def test_a_loss_without_it_is_called_as_before():
    def loss_fn(model, params, batch, rng, config, model_state):
        y = model.apply({"params": params}, batch["x"])
        return jnp.mean(y**2), {"metrics": {"seen_step": jnp.float32(-1)}, "model_state": model_state}

    assert _run(loss_fn, 1) == [-1.0, -1.0, -1.0]
