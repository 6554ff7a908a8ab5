"""VectorQuantizer: straight-through gradients, losses, EMA updates, dead-code restarts, a tiny fit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlm_jax.layers import VectorQuantizer, restart_dead_codes


@functools.cache
def _jit_apply(module):
    return jax.jit(module.apply, static_argnames=("method", "train", "mutable"))


def _apply(module, variables, *args, **kwargs):
    """module.apply compiled once per module and signature: eager flax compiles op by op (slow)."""
    if "mutable" in kwargs:
        kwargs["mutable"] = tuple(kwargs["mutable"])
    return _jit_apply(module)(variables, *args, **kwargs)


def _init(module, *args):
    return jax.jit(module.init)(_key(), *args)


def _key(seed=0):
    # rbg keys: threefry's random bits take XLA:CPU seconds to compile.
    return jax.random.key(seed, impl="rbg")


def _x(*shape, seed=0, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _nearest(x, codebook):
    x = np.asarray(x, np.float64).reshape(-1, codebook.shape[1])
    dist = ((x[:, None] - np.asarray(codebook, np.float64)[None]) ** 2).sum(-1)
    return dist.argmin(1)


@pytest.mark.parametrize("ema", [False, True])
def test_forward_indices_losses_and_any_leading_shape(ema):
    vq = VectorQuantizer(num_codes=16, beta=0.3, ema=ema)
    x = _x(2, 3, 5, 8)
    variables = _init(vq, x)
    q, aux = _apply(vq, variables, x)
    codebook = np.asarray(_apply(vq, variables, method=VectorQuantizer.get_codebook))
    assert codebook.shape == (16, 8)
    assert ("codebook" in variables["vq_stats"]) == ema and ("params" in variables) != ema
    idx = _nearest(x, codebook)
    assert q.shape == x.shape and aux["indices"].shape == (2, 3, 5) and aux["indices"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(aux["indices"]).ravel(), idx)
    np.testing.assert_allclose(np.asarray(q).reshape(-1, 8), codebook[idx], rtol=1e-6, atol=1e-6)
    err = np.mean((np.asarray(x).reshape(-1, 8) - codebook[idx]) ** 2)
    np.testing.assert_allclose(float(aux["commitment_loss"]), 0.3 * err, rtol=1e-5)
    np.testing.assert_allclose(float(aux["codebook_loss"]), 0.0 if ema else err, rtol=1e-5)
    np.testing.assert_allclose(float(aux["loss"]), float(aux["commitment_loss"] + aux["codebook_loss"]))
    counts = np.bincount(idx, minlength=16) / idx.size
    p = counts[counts > 0]
    np.testing.assert_allclose(float(aux["perplexity"]), np.exp(-(p * np.log(p)).sum()), rtol=1e-5)
    np.testing.assert_allclose(float(aux["usage"]), (counts > 0).mean())
    # encode / lookup: the tokenizer's two halves.
    tokens = _apply(vq, variables, x, method=VectorQuantizer.encode)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(aux["indices"]))
    looked_up = _apply(vq, variables, tokens, method=VectorQuantizer.lookup)
    np.testing.assert_array_equal(np.asarray(looked_up), np.asarray(q))  # Exactly the codebook rows.
    # bf16 inputs come back as bf16.
    qb, _ = _apply(vq, variables, x.astype(jnp.bfloat16))
    assert qb.dtype == jnp.bfloat16


def test_straight_through_gradient_is_identity():
    vq = VectorQuantizer(num_codes=8)
    x = _x(4, 6, 5)
    variables = _init(vq, x)
    q, vjp = jax.vjp(lambda x: _apply(vq, variables, x)[0], x)
    cotangent = _x(4, 6, 5, seed=3)
    (grad,) = vjp(cotangent)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(cotangent), rtol=1e-6)


def test_loss_gradients():
    """Commitment pulls x to sg(q); the codebook loss pulls the used codes to sg(x) (ema=False)."""
    vq = VectorQuantizer(num_codes=4, beta=0.5)
    x = _x(10, 3)
    variables = _init(vq, x)
    codebook = np.asarray(variables["params"]["codebook"])
    idx = _nearest(x, codebook)
    q = codebook[idx]

    def losses(params, x):
        _, aux = _apply(vq, {**variables, "params": params}, x)
        return aux["commitment_loss"], aux["codebook_loss"]

    gx = jax.grad(lambda x: losses(variables["params"], x)[0])(x)
    np.testing.assert_allclose(np.asarray(gx), 0.5 * 2 * (np.asarray(x) - q) / x.size, rtol=1e-5, atol=1e-7)
    assert not np.any(jax.grad(lambda p: losses(p, x)[0])(variables["params"])["codebook"])
    gc = jax.grad(lambda p: losses(p, x)[1])(variables["params"])["codebook"]
    want = np.zeros_like(codebook)
    np.add.at(want, idx, 2 * (q - np.asarray(x)) / x.size)
    np.testing.assert_allclose(np.asarray(gc), want, rtol=1e-5, atol=1e-7)
    assert not np.any(jax.grad(lambda x: losses(variables["params"], x)[1])(x))


def test_ema_update_matches_hand_computation():
    decay, eps = 0.5, 0.1
    vq = VectorQuantizer(num_codes=3, ema=True, decay=decay, epsilon=eps)
    x = jnp.asarray([[0.0, 0.1], [0.2, 0.0], [1.1, 1.0], [5.0, 5.0]], jnp.float32)
    codebook = np.asarray([[0.0, 0.0], [1.0, 1.0], [-4.0, 4.0]], np.float32)
    embed_sum = np.asarray([[0.5, 0.5], [2.0, 2.0], [-4.0, 4.0]], np.float32)
    cluster_size = np.asarray([2.0, 1.0, 0.5], np.float32)
    stats = {"codebook": jnp.asarray(codebook), "embed_sum": jnp.asarray(embed_sum),
             "cluster_size": jnp.asarray(cluster_size)}
    variables = {"vq_stats": stats}
    (q, aux), new = _apply(vq, variables, x, train=True, mutable=["vq_stats"])
    # Assignments: rows 0, 1 -> code 0; rows 2, 3 -> code 1 (5,5 is nearer 1,1 than -4,4); code 2 unused.
    np.testing.assert_array_equal(np.asarray(aux["indices"]), [0, 0, 1, 1])
    np.testing.assert_allclose(np.asarray(q), codebook[[0, 0, 1, 1]])  # Output uses the pre-update codebook.
    counts = np.asarray([2.0, 2.0, 0.0])
    sums = np.asarray([[0.2, 0.1], [6.1, 6.0], [0.0, 0.0]])
    size = decay * cluster_size + (1 - decay) * counts  # [2, 1.5, 0.25]
    esum = decay * embed_sum + (1 - decay) * sums
    n = size.sum()
    smoothed = (size + eps) / (n + 3 * eps) * n
    new_stats = new["vq_stats"]
    np.testing.assert_allclose(np.asarray(new_stats["cluster_size"]), size, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new_stats["embed_sum"]), esum, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new_stats["codebook"]), esum / smoothed[:, None], rtol=1e-5)
    assert float(aux["codebook_loss"]) == 0.0
    # Not training: nothing changes (and nothing needs to be mutable).
    (_, _), same = _apply(vq, variables, x, mutable=["vq_stats"])
    for k in stats:
        np.testing.assert_array_equal(np.asarray(same["vq_stats"][k]), np.asarray(stats[k]))


def test_non_ema_tracks_usage():
    vq = VectorQuantizer(num_codes=3, decay=0.5)
    x = jnp.asarray([[0.0, 0.0], [0.1, 0.0], [1.0, 1.0]], jnp.float32)
    params = {"codebook": jnp.asarray([[0.0, 0.0], [1.0, 1.0], [9.0, 9.0]])}
    variables = {"params": params, "vq_stats": {"cluster_size": jnp.ones((3,))}}
    (_, _), new = _apply(vq, variables, x, train=True, mutable=["vq_stats"])
    np.testing.assert_allclose(np.asarray(new["vq_stats"]["cluster_size"]), [1.5, 1.0, 0.5])
    with pytest.raises(ValueError, match="mutable"):
        _apply(vq, variables, x, train=True)


@pytest.mark.parametrize("ema", [True, False])
def test_dead_code_restart_replaces_unused_code_with_batch_vector(ema):
    vq = VectorQuantizer(num_codes=4, ema=ema, decay=0.5, dead_code_threshold=0.8)
    x = _x(32, 3, seed=1)
    codebook = jnp.asarray([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [50.0, 50.0, 50.0]])
    stats = {"cluster_size": jnp.ones((4,))}
    if ema:
        variables = {"vq_stats": {**stats, "codebook": codebook, "embed_sum": codebook}}
        mutable = ["vq_stats"]
    else:
        variables = {"params": {"codebook": codebook}, "vq_stats": stats}
        mutable = ["vq_stats", "params"]

    def step(seed):
        return _apply(vq, variables, x, train=True, mutable=mutable, rngs={"dropout": _key(seed)})

    (_, aux), new = step(7)
    assert not np.any(np.asarray(aux["indices"]) == 3)  # Code 3 is far from the data: unused.
    new_codebook = np.asarray(new["vq_stats" if ema else "params"]["codebook"])
    matches = np.all(np.isclose(np.asarray(x), new_codebook[3]), axis=1)
    assert matches.any(), "code 3 was not restarted to a vector of the batch"
    assert int(aux["restarted"]) == 1
    np.testing.assert_allclose(np.asarray(new["vq_stats"]["cluster_size"])[3], 1.0)  # max(1, threshold).
    if ema:
        np.testing.assert_allclose(np.asarray(new["vq_stats"]["embed_sum"])[3], new_codebook[3], rtol=1e-6)
    else:
        np.testing.assert_array_equal(new_codebook[:3], np.asarray(codebook)[:3])  # Live codes untouched.
    # Deterministic given the rng; a different rng may pick another vector.
    (_, _), again = step(7)
    np.testing.assert_array_equal(np.asarray(again["vq_stats" if ema else "params"]["codebook"]), new_codebook)
    if not ema:
        with pytest.raises(ValueError, match="'params' must be mutable"):
            _apply(vq, variables, x, train=True, mutable=["vq_stats"], rngs={"dropout": _key(0)})


def test_restart_dead_codes_function():
    codebook = jnp.zeros((5, 2))
    vectors = jnp.arange(20.0).reshape(10, 2) + 1.0
    new, dead = restart_dead_codes(codebook, jnp.asarray([0.0, 2.0, 0.1, 3.0, 0.0]), vectors, _key(3), 1.0)
    np.testing.assert_array_equal(np.asarray(dead), [True, False, True, False, True])
    new = np.asarray(new)
    assert not new[[1, 3]].any()
    for row in new[[0, 2, 4]]:
        assert np.any(np.all(row == np.asarray(vectors), axis=1))


def _mixture(n, centers, rng, std=0.1):
    which = rng.integers(0, len(centers), size=n)
    return centers[which] + std * rng.normal(size=(n, centers.shape[1]))


@pytest.mark.parametrize("ema", [False, True])
def test_tiny_training_fits_gaussian_mixture(ema):
    """200 steps on a 16-component mixture: quantisation error drops and most codes get used."""
    k, d, batch, steps = 16, 4, 256, 200
    rng = np.random.default_rng(0)
    centers = 2.0 * rng.normal(size=(k, d))
    data = jnp.asarray(np.stack([_mixture(batch, centers, rng) for _ in range(steps)]), jnp.float32)
    held_out = jnp.asarray(_mixture(4096, centers, rng), jnp.float32)
    vq = VectorQuantizer(num_codes=k, ema=ema, decay=0.9, dead_code_threshold=0.5)
    variables = _init(vq, data[0])
    tx = optax.adam(0.05)
    mutable = ["vq_stats"] if ema else ["vq_stats", "params"]

    def quant_error(variables):
        q, aux = _apply(vq, variables, held_out)
        return jnp.mean(jnp.sum((q - held_out) ** 2, -1)), aux["usage"]

    @jax.jit
    def train(variables):
        opt_state = tx.init(variables.get("params", {}))

        def step(carry, inputs):
            variables, opt_state = carry
            x, i = inputs
            params = variables.get("params", {})

            def loss_fn(params):
                (_, aux), new = _apply(
                    vq,
                    {**variables, "params": params},
                    x,
                    train=True,
                    mutable=mutable,
                    rngs={"dropout": jax.random.fold_in(_key(1), i)},
                )
                return aux["loss"], new

            (_, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            new = dict(new)
            # Restarts (ema=False) rewrote params: take them, then apply the gradient step.
            params = new.pop("params", params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            variables = {**variables, **new, **({"params": params} if params else {})}
            return (variables, opt_state), None

        (variables, _), _ = jax.lax.scan(step, (variables, opt_state), (data, jnp.arange(steps)))
        return variables

    before, _ = quant_error(variables)
    trained = train(variables)
    after, usage = quant_error(trained)
    print(f"ema={ema}: quantisation error {float(before):.3f} -> {float(after):.3f}, usage {float(usage):.2f}")
    assert float(after) < 0.25 * float(before), (float(before), float(after))
    assert float(usage) >= 0.75, float(usage)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_impl_matches_xla(impl):
    x = _x(3, 40, 6, seed=4)
    xla = VectorQuantizer(num_codes=50, impl="xla")
    variables = _init(xla, x)
    q_ref, aux_ref = _apply(xla, variables, x)
    q, aux = _apply(VectorQuantizer(num_codes=50, impl=impl, interpret=True), variables, x)
    np.testing.assert_array_equal(np.asarray(aux["indices"]), np.asarray(aux_ref["indices"]))
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q_ref))
