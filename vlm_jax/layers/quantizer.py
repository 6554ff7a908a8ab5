"""Vector quantisation (VQ-VAE): nearest codebook entry, straight-through gradients, EMA codebooks.

`VectorQuantizer` maps encoder outputs [..., d] to their nearest codebook rows (searched with
`vlm_jax.kernels.vq_nearest`, fused Pallas kernels on GPU/TPU) and returns the quantised vectors with
straight-through gradients plus the VQ-VAE losses and codebook statistics. It is the bottleneck of a
VQ / dVAE image tokenizer: `__call__` in training, `encode` for token ids, `lookup` to decode them.

Two ways to learn the codebook:

* ``ema=False``: the codebook is the param ``params/codebook`` [K, d], learned through
  ``codebook_loss = mean((sg(x) - q)^2)`` (van den Oord et al. 2017).
* ``ema=True``: the codebook is state, ``vq_stats/codebook``, the Laplace-smoothed ratio of two
  exponential moving averages updated in training (VQ-VAE-2, SoundStream):
  ``cluster_size <- decay * cluster_size + (1 - decay) * counts`` and
  ``embed_sum <- decay * embed_sum + (1 - decay) * sum of the vectors assigned to each code``, then
  ``n = sum(cluster_size)``, ``smoothed = (cluster_size + eps) / (n + K * eps) * n`` and
  ``codebook = embed_sum / smoothed``. No codebook loss (it is reported as 0).
  The averages start at ``cluster_size = 1``, ``embed_sum = initial codebook``.

Both modes add ``commitment_loss = beta * mean((x - sg(q))^2)`` (means over every element) and keep
``vq_stats/cluster_size`` (the EMA of per-step code counts, in vectors per step; it is the usage that
dead-code restarts look at). Statistics change only with ``train=True`` and a mutable "vq_stats"
collection, e.g. ``model.apply(variables, x, train=True, mutable=["vq_stats"], rngs={"dropout": key})``.
Call ``init`` with ``train=False`` (the default).

Dead-code restarts (``dead_code_threshold > 0``): after the update, every code whose ``cluster_size``
is below the threshold is re-initialised to a vector of the current batch drawn uniformly (with
replacement) with the rng stream ``restart_rng`` ("dropout" by default, what `vlm_jax.tasks.base`
passes), so it is deterministic given that key; its ``cluster_size`` is reset to
``max(1, threshold)`` (and its ``embed_sum`` to vector * that). Under ``ema=True`` the codebook is
state and this just works; under ``ema=False`` it rewrites ``params/codebook``, which must then be
mutable too (otherwise a ValueError says so): prefer ``ema=True`` with restarts, or call
`restart_dead_codes` on the params yourself between steps.

Sharding: under jit with a batch-sharded input, counts and sums are global (GSPMD inserts the
reductions); the Pallas nearest-neighbour kernels are not partitioned automatically (see
`vlm_jax.kernels.vq`), so pick ``impl="xla"`` or wrap the call in shard_map for large sharded batches.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.kernels import vq_nearest

STATS = "vq_stats"
Initializer = Callable[..., jax.Array]


def restart_dead_codes(
    codebook: jax.Array, usage: jax.Array, vectors: jax.Array, rng: jax.Array, threshold: float
) -> tuple[jax.Array, jax.Array]:
    """Replaces codes with ``usage < threshold`` by random rows of ``vectors``.

    Args:
      codebook: [K, d] codebook.
      usage: [K] usage statistic (e.g. the EMA cluster size).
      vectors: [M, d] candidate vectors (e.g. the encoder outputs of the current batch), M >= 1.
      rng: PRNG key; the choice of replacement vectors is a deterministic function of it.
      threshold: codes with usage strictly below it are restarted.

    Returns:
      (new codebook [K, d] in codebook's dtype, restarted mask bool [K]).
    """
    dead = usage < threshold
    choice = jax.random.randint(rng, (codebook.shape[0],), 0, vectors.shape[0])
    candidates = jnp.take(vectors, choice, axis=0).astype(codebook.dtype)
    return jnp.where(dead[:, None], candidates, codebook), dead


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation: x [..., d] -> (quantised [..., d], aux dict); see the module doc.

    Attributes:
      num_codes: codebook size K.
      beta: weight of the commitment loss.
      ema: learn the codebook with exponential moving averages (state) instead of gradients (param).
      decay: EMA decay, for the codebook averages and for the usage statistic.
      epsilon: Laplace smoothing of the EMA cluster sizes.
      dead_code_threshold: restart codes whose EMA cluster size falls below it; 0 disables restarts.
      restart_rng: name of the rng stream restarts draw from.
      impl: nearest-neighbour implementation for `vq_nearest` ("auto", "xla", "pallas_gpu", "pallas_tpu").
      interpret: run a Pallas `impl` in the Pallas interpreter (tests on CPU).
      search_dtype: dtype of the nearest-neighbour search operands (bf16 halves its memory traffic;
        distances still accumulate in float32). Losses and outputs are computed in float32.
      codebook_init: initializer of the [K, d] codebook (default: variance 1/d, so ||c||^2 ~ 1).
    """

    num_codes: int
    beta: float = 0.25
    ema: bool = False
    decay: float = 0.99
    epsilon: float = 1e-5
    dead_code_threshold: float = 0.0
    restart_rng: str = "dropout"
    impl: str = "auto"
    interpret: bool = False
    search_dtype: Any = jnp.float32
    codebook_init: Initializer = nn.initializers.variance_scaling(
        1.0, "fan_in", "uniform", in_axis=-1, out_axis=-2
    )

    def get_codebook(self) -> jax.Array:
        """The current codebook [K, d], float32 (after init; use with `apply(..., method=...)`)."""
        collection = STATS if self.ema else "params"
        if not self.has_variable(collection, "codebook"):
            raise ValueError("VectorQuantizer.get_codebook: the codebook does not exist yet; run init first")
        return self.get_variable(collection, "codebook")

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Token ids [...] -> codebook vectors [..., d] (float32): the decoder side of a tokenizer."""
        return jnp.take(self.get_codebook(), indices, axis=0)

    def encode(self, x: jax.Array) -> jax.Array:
        """x [..., d] -> token ids [...] int32 (nearest codes; no statistics, no gradients)."""
        codebook = self.get_codebook()
        flat = x.reshape(-1, x.shape[-1])
        indices, _ = vq_nearest(
            flat.astype(self.search_dtype),
            codebook.astype(self.search_dtype),
            impl=self.impl,
            interpret=self.interpret,
        )
        return indices.reshape(x.shape[:-1])

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Quantises x [..., d].

        Returns:
          quantised: [..., d] in x's dtype; forward value exactly the nearest codebook rows, gradient
            w.r.t. x the identity (straight-through, as ``x + stop_gradient(q - x)``), none to the codebook.
          aux: dict with
            "indices" int32 [...]; "commitment_loss", "codebook_loss" (0 under EMA) and their sum
            "loss" (scalars); "perplexity" (exp of the entropy of this batch's code histogram);
            "usage" (fraction of codes used in this batch); "restarted" (codes restarted this step).
        """
        d = x.shape[-1]
        k = self.num_codes
        shape = (k, d)
        if self.ema:
            codebook_var = self.variable(
                STATS, "codebook", lambda: self.codebook_init(self.make_rng("params"), shape, jnp.float32)
            )
            codebook = codebook_var.value
            embed_sum = self.variable(STATS, "embed_sum", lambda: codebook_var.value)
        else:
            codebook = self.param("codebook", self.codebook_init, shape, jnp.float32)
        cluster_size = self.variable(STATS, "cluster_size", lambda: jnp.ones((k,), jnp.float32))

        flat = x.reshape(-1, d).astype(jnp.float32)
        indices, _ = vq_nearest(
            jax.lax.stop_gradient(flat).astype(self.search_dtype),
            jax.lax.stop_gradient(codebook).astype(self.search_dtype),
            impl=self.impl,
            interpret=self.interpret,
        )
        q = jnp.take(codebook, indices, axis=0)  # [M, d]; carries the codebook gradient (ema=False).

        commitment_loss = self.beta * jnp.mean(jnp.square(flat - jax.lax.stop_gradient(q)))
        if self.ema:
            codebook_loss = jnp.zeros((), jnp.float32)
        else:
            codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(flat) - q))
        # Straight-through: the value is exactly q (x - sg(x) is exactly 0), the gradient w.r.t. x the
        # identity; the same estimator as x + sg(q - x), without its rounding of the forward value.
        quantized = jax.lax.stop_gradient(q) + (flat - jax.lax.stop_gradient(flat))

        # Scatter-adds, not a one-hot [M, K] matrix: at tokenizer scale that would be gigabytes.
        counts = jax.ops.segment_sum(jnp.ones_like(indices, jnp.float32), indices, num_segments=k)
        probs = counts / jnp.maximum(flat.shape[0], 1)
        entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
        restarted = jnp.zeros((), jnp.int32)

        if train and not self.is_initializing():
            if not self.is_mutable_collection(STATS):
                raise ValueError(f"VectorQuantizer(train=True) updates the {STATS!r} collection: pass mutable=[...]")
            sg_flat = jax.lax.stop_gradient(flat)
            new_size = self.decay * cluster_size.value + (1.0 - self.decay) * counts
            if self.ema:
                sums = jax.ops.segment_sum(sg_flat, indices, num_segments=k)  # [K, d]
                new_sum = self.decay * embed_sum.value + (1.0 - self.decay) * sums
                n = jnp.sum(new_size)
                smoothed = (new_size + self.epsilon) / (n + k * self.epsilon) * n
                new_codebook = new_sum / smoothed[:, None]
            else:
                new_codebook = jax.lax.stop_gradient(codebook)
            if self.dead_code_threshold > 0 and flat.shape[0] > 0:  # An empty batch has nothing to draw.
                if not self.ema and not self.is_mutable_collection("params"):
                    raise ValueError(
                        "VectorQuantizer dead-code restarts with ema=False rewrite params/codebook, so "
                        "'params' must be mutable; use ema=True, or call restart_dead_codes between steps"
                    )
                new_codebook, dead = restart_dead_codes(
                    new_codebook, new_size, sg_flat, self.make_rng(self.restart_rng), self.dead_code_threshold
                )
                reset = max(1.0, float(self.dead_code_threshold))
                new_size = jnp.where(dead, reset, new_size)
                if self.ema:
                    new_sum = jnp.where(dead[:, None], new_codebook * reset, new_sum)
                else:
                    self.put_variable("params", "codebook", new_codebook)
                restarted = jnp.sum(dead.astype(jnp.int32))
            cluster_size.value = new_size
            if self.ema:
                codebook_var.value = new_codebook
                embed_sum.value = new_sum

        aux = {
            "indices": indices.reshape(x.shape[:-1]),
            "commitment_loss": commitment_loss,
            "codebook_loss": codebook_loss,
            "loss": commitment_loss + codebook_loss,
            "perplexity": jnp.exp(entropy),
            "usage": jnp.mean((counts > 0).astype(jnp.float32)),
            "restarted": restarted,
        }
        return quantized.reshape(x.shape).astype(x.dtype), aux
