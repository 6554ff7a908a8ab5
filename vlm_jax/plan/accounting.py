"""Byte and FLOP accounting of the plan.

* params, optimiser state, gradients and batch bytes: exact, from each array's shape, dtype and
  sharding (`sharding.shard_shape(shape)`);
* FLOPs per step: counted on the step's jaxpr (every matmul and convolution executed, backward pass
  and remat recomputation included, scan bodies times their length), the analytic 6*N*tokens (+
  attention) for language models, and XLA's cost_analysis (per device; XLA counts a loop body once,
  so it undercounts scanned layers).
"""

from __future__ import annotations

import math
from typing import Any


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of arrays / ShapeDtypeStructs with shardings (the largest
    shard where shards differ: NamedShardings of equal-size shards on every device)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            shape = tuple(sharding.shard_shape(shape))
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def total_bytes(tree: Any) -> int:
    """Bytes of a tree of arrays / ShapeDtypeStructs, unsharded."""
    import jax

    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def count_params(tree: Any) -> int:
    import jax

    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _sub_jaxprs(value):
    from jax.extend import core as jex_core

    jaxpr_types = (jex_core.Jaxpr, jex_core.ClosedJaxpr)
    if isinstance(value, jaxpr_types):
        yield value.jaxpr if isinstance(value, jex_core.ClosedJaxpr) else value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _sub_jaxprs(item)


def jaxpr_flops(jaxpr: Any) -> tuple[float, bool]:
    """(matmul + convolution FLOPs the jaxpr executes, whether a while loop of unknown trip count
    was counted once). Global (unsharded) shapes; scan bodies count `length` times, cond the
    costliest branch, remat and custom_vjp bodies as they appear (the recomputation is explicit)."""
    from jax.extend import core as jex_core

    if isinstance(jaxpr, jex_core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total, unknown_loops = 0.0, False
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contract)
            continue
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
            per_output = math.prod(rhs[i] for i in rhs_spec[1:])
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
            continue
        subs = [s for v in eqn.params.values() for s in _sub_jaxprs(v)]
        if not subs:
            continue
        counted = [jaxpr_flops(s) for s in subs]
        unknown_loops |= any(u for _, u in counted)
        if name == "cond":
            total += max(f for f, _ in counted)
        elif name == "scan":
            total += eqn.params["length"] * sum(f for f, _ in counted)
        elif name == "while":
            unknown_loops = True
            total += sum(f for f, _ in counted)
        else:
            total += sum(f for f, _ in counted)
    return total, unknown_loops


def compiler_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends have none
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def analytic_lm_flops(config, params: int, rows: int, length: int) -> dict[str, float] | None:
    """6 * N * tokens (+ the attention term 12 * layers * T * width per token, PaLM's appendix B)."""
    if config.task.name != "lm":
        return None
    model = config.model
    tokens = rows * length
    dense = 6.0 * params * tokens
    heads = int(model.heads)
    head_dim = int(model.get("head_dim", 0) or int(model.width) // heads)
    attn = 12.0 * int(model.depth) * length * heads * head_dim * tokens
    return {"six_n_tokens": dense, "attention": attn, "total": dense + attn, "tokens": tokens}
