"""What the plain-JAX peers of the GPU report (plain_llama, plain_clip) share: attention through
jax.nn.dot_product_attention, the remat policy, norms, AdamW, and their jitted, timed train step.

No flax and no vlm_jax layers: this is the "what plain JAX does" reference. Params are float32,
computation runs in a given dtype, norms' statistics in float32 (as every mixed-precision recipe).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlm_jax.bench.common import time_with_losses

# Saves the projection matmuls and recomputes the rest in the backward pass: what ANCHORS.md's
# plain-JAX figures use ("remat saving dots"), and vlm_jax's remat "dots".
REMAT_POLICY = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, impl: str | None) -> jax.Array:
    """q [B, T, H, D], k/v [B, T, K, D] (H % K == 0) -> [B, T, H, D]; impl as
    jax.nn.dot_product_attention's `implementation` ("cudnn", "xla", None: JAX's own choice)."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x [..., C] / rms(x) * scale [C], statistics in float32, back in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * scale).astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm of the last axis of x [..., C] (biased variance), float32 statistics."""
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
    return (y * scale + bias).astype(x.dtype)


def normal_params(key: jax.Array, shapes: dict[str, Any], std: Callable[[tuple[int, ...]], float]) -> dict:
    """A nested dict of float32 arrays of `shapes` (a nested dict of shape tuples): leaves named
    'scale' are ones, 'bias' zeros, the others normal with std(shape)."""
    leaves, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    sizes = [math.prod(shape) for _, shape in leaves]
    # One draw cut into leaves: XLA's CPU compiler took seconds over one random op per leaf.
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
    out, start = [], 0
    for (path, shape), size in zip(leaves, sizes):
        name = path[-1].key
        if name == "scale":
            out.append(jnp.ones(shape, jnp.float32))
        elif name == "bias":
            out.append(jnp.zeros(shape, jnp.float32))
        else:
            out.append(std(shape) * flat[start:start + size].reshape(shape))
        start += size
    return jax.tree.unflatten(treedef, out)


def param_count(params: Any) -> int:
    """Elements over all leaves."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


def adamw(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with config.optim's lr / betas / eps / decay on the params
    of 2+ dims (as our optimiser's decay mask and the torch peers); a constant learning rate: the
    schedule changes values, not the work of a step."""
    decay = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    opt = optax.adamw(float(cfg.lr), b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                      weight_decay=float(cfg.weight_decay), mask=decay)
    return optax.chain(optax.clip_by_global_norm(float(cfg.clip_norm)), opt) if cfg.clip_norm > 0 else opt


def timed_train(
    loss_of: Callable[[str | None], Callable[[Any, Any], jax.Array]], impls: tuple[str | None, ...],
    params: Any, batch: Any, cfg: ml_collections.ConfigDict, steps: int, warmup: int,
) -> dict[str, Any]:
    """Times the jitted step params, opt_state <- AdamW(grad loss(params, batch)), both donated.

    loss_of(impl) is the loss for one attention implementation; the first of `impls` that
    compiles is timed (cuDNN refuses some shapes only when compiled), the refusals are reported.
    first_step_s includes the compile, as for our step.
    """
    tx = adamw(cfg)
    opt_state = tx.init(params)
    refused = []
    for impl in impls:
        loss = loss_of(impl)

        def step(params: Any, opt_state: Any, batch: Any, loss: Callable = loss) -> tuple[Any, Any, jax.Array]:
            value, grads = jax.value_and_grad(loss)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        t0 = time.perf_counter()
        try:
            compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
        except Exception as e:  # Any refusal of this impl; the next one is tried.
            if impl == impls[-1]:
                raise
            refused.append(f"{impl}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
            continue
        compile_s = time.perf_counter() - t0
        break
    holder = {"params": params, "opt_state": opt_state}

    def one_step() -> jax.Array:
        holder["params"], holder["opt_state"], value = compiled(holder["params"], holder["opt_state"], batch)
        return jax.block_until_ready(value)

    timing = time_with_losses(one_step, steps, warmup)
    timing["first_step_s"] += compile_s
    return dict(timing, compile_s=compile_s, attention_impl=impl or "jax default (None)",
                attention_refused=refused)
