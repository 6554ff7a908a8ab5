"""Layers: attention masking, norms, patch embedding, the encoder stack (scan / remat)."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.layers.attention import MultiHeadAttention
from vlm_jax.layers.embeddings import PatchEmbedding
from vlm_jax.layers.mlp import activation
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.transformer import Encoder, stack_layers, unstack_layers


def _key(seed=0):
    # rbg keys: threefry's random bits take XLA:CPU seconds to compile, most of an init's cost.
    return jax.random.key(seed, impl="rbg")


@functools.cache
def _jit_apply(module):
    return jax.jit(module.apply, static_argnames=("method", "train", "mutable"))


def _apply(module, variables, *args, **kwargs):
    # Compiled once per module: eager flax compiles op by op, which is slower on a small CPU.
    return _jit_apply(module)(variables, *args, **kwargs)


def _x(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_causal_mask(causal):
    layer = MultiHeadAttention(num_heads=2, causal=causal)
    x = _x(2, 6, 8)
    params = jax.jit(layer.init)(_key(1), x)
    y = _apply(layer, params, x)
    x2 = x.at[:, 4].set(5.0)  # change a later position
    y2 = _apply(layer, params, x2)
    assert y.shape == (2, 6, 8)
    earlier_same = np.allclose(y[:, :4], y2[:, :4], atol=1e-6)
    assert earlier_same == causal
    assert not np.allclose(y[:, 4:], y2[:, 4:])


def test_attention_cross_and_out_features():
    layer = MultiHeadAttention(num_heads=2, out_features=5)
    q, kv = _x(3, 1, 8), _x(3, 7, 8, seed=1)
    params = jax.jit(layer.init)(_key(0), q, kv)
    assert _apply(layer, params, q, kv).shape == (3, 1, 5)
    shapes = jax.tree.map(jnp.shape, nn.unbox(params))["params"]
    assert shapes["query"]["kernel"] == (8, 2, 4) and shapes["out"]["kernel"] == (2, 4, 5)


def test_attention_matches_manual_softmax():
    layer = MultiHeadAttention(num_heads=1, qkv_bias=False, out_bias=False)
    x = _x(1, 3, 4)
    p = nn.unbox(jax.jit(layer.init)(_key(0), x))["params"]
    wq, wk, wv = (p[n]["kernel"][:, 0] for n in ("query", "key", "value"))
    q, k, v = x[0] @ wq, x[0] @ wk, x[0] @ wv
    w = jax.nn.softmax(q @ k.T / 2.0, axis=-1)
    want = (w @ v) @ p["out"]["kernel"][0]
    np.testing.assert_allclose(_apply(layer, {"params": p}, x)[0], want, atol=1e-5)


def test_layer_norm_float32_stats_and_dtype():
    x = _x(2, 3, 16) * 10 + 3
    ln = LayerNorm(1e-5, jnp.bfloat16)
    params = jax.jit(ln.init)(_key(0), x)
    y = _apply(ln, params, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.1)
    assert jax.tree.leaves(nn.unbox(params))[0].dtype == jnp.float32


def test_standardize_gradient_matches_autodiff():
    from vlm_jax.layers.norms import standardize

    def autodiff(x):
        centred = x - x.mean(-1, keepdims=True)
        return centred * jax.lax.rsqrt(jnp.mean(centred**2, -1, keepdims=True) + 1e-5)

    x = _x(3, 5, 24) * 4 + 1
    g = _x(3, 5, 24, seed=1)
    np.testing.assert_allclose(standardize(x, 1e-5), autodiff(x), atol=1e-6)
    want = jax.vjp(autodiff, x)[1](g)[0]
    got = jax.vjp(lambda x: standardize(x, 1e-5), x)[1](g)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Second order (through the hand-written backward) agrees too.
    hess = lambda f: jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(f(x) * g))(x) ** 2))(x)  # noqa: E731
    np.testing.assert_allclose(hess(lambda x: standardize(x, 1e-5)), hess(autodiff), atol=1e-4)


def test_patch_embedding_is_a_strided_conv():
    layer = PatchEmbedding(width=6, patch_size=4)
    x = _x(2, 8, 12, 3)
    params = nn.unbox(jax.jit(layer.init)(_key(0), x))
    params = jax.tree.map(lambda a: a + 0.1, params)  # non-zero bias
    y = _apply(layer, params, x)
    k, b = params["params"]["kernel"], params["params"]["bias"]
    conv = jax.lax.conv_general_dilated(
        x, k, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(y, (conv + b).reshape(2, 6, 6), atol=1e-5)


def test_activations():
    x = jnp.array([-1.0, 0.5, 2.0])
    erf_gelu = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in [-1.0, 0.5, 2.0]]
    np.testing.assert_allclose(activation("gelu")(x), erf_gelu, rtol=1e-6)
    np.testing.assert_allclose(activation("quick_gelu")(x), x * jax.nn.sigmoid(1.702 * x))
    with pytest.raises(ValueError, match="unknown activation"):
        activation("swishy")


def _encoder(**kw):
    return Encoder(depth=3, num_heads=2, mlp_dim=16, causal=True, **kw)


def test_scan_matches_loop_with_restacked_params():
    x = _x(2, 5, 8)
    looped = nn.unbox(jax.jit(_encoder().init)(_key(0), x))["params"]
    scanned = stack_layers(looped)
    assert set(scanned) == {"layers"}
    assert scanned["layers"]["mlp"]["fc1"]["kernel"].shape == (3, 8, 16)
    want = _apply(_encoder(), {"params": looped}, x)
    got = _apply(_encoder(scan_layers=True), {"params": scanned}, x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    back = unstack_layers(scanned)
    jax.tree.map(np.testing.assert_array_equal, back, looped)


def test_scan_init_tree_and_layers_axis():
    x = _x(1, 4, 8)
    boxed = jax.eval_shape(_encoder(scan_layers=True).init, _key(0), x)["params"]
    spec = nn.get_partition_spec(boxed)
    assert tuple(spec["layers"]["attn"]["query"]["kernel"]) == ("layers", "embed", "heads", "kv")


def test_remat_keeps_values_and_grads():
    x = _x(2, 5, 8)
    params = nn.unbox(jax.jit(_encoder().init)(_key(0), x))["params"]

    def value_and_grad(model, p):
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(_apply(model, {"params": p}, x) ** 2)))(
            p
        )

    l0, g0 = value_and_grad(_encoder(), params)
    for remat, scan in (("full", True), ("dots", False)):
        p = stack_layers(params) if scan else params
        l1, g1 = value_and_grad(_encoder(scan_layers=scan, remat=remat), p)
        g1 = unstack_layers(g1) if scan else g1
        np.testing.assert_allclose(l1, l0, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g0, g1)


def test_unknown_remat_is_an_error():
    with pytest.raises(ValueError, match="remat"):
        jax.jit(_encoder(remat="some").init)(_key(0), _x(1, 2, 8))


def test_sharded_init_and_apply_under_a_mesh():
    """Init and apply in a 2x2x2 (data, fsdp, tensor) mesh under the default rules, as the trainer
    does: every logical name must fit the array it is attached to."""
    from jax.sharding import Mesh, PartitionSpec

    from vlm_jax.config_defaults import DEFAULT_RULES
    from vlm_jax.parallel.rules import mesh_shardings

    rules = [tuple(r) for r in DEFAULT_RULES]
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    model = Encoder(depth=2, num_heads=2, mlp_dim=16, scan_layers=True)
    x = _x(4, 5, 8)
    shardings = mesh_shardings(jax.eval_shape(model.init, _key(0), x), mesh, rules)
    # Under the mesh, unboxing constrains each param by its names: flax's nn.DenseGeneral would fail
    # here (it unboxes its kernel while still flattened); ours is built at full shape.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init = jax.jit(lambda k, x: nn.unbox(model.init(k, x)), out_shardings=shardings)
        variables = init(_key(0), x)
        y = jax.jit(model.apply)(variables, x)
    kernel = variables["params"]["layers"]["attn"]["query"]["kernel"]
    # [layers, embed, heads, kv]: embed -> fsdp, heads -> tensor.
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert y.shape == (4, 5, 8)


def test_token_embedding_is_nn_embed_with_a_vocab_parallel_lookup():
    """Same param tree and values as nn.Embed (checkpoints and converters unchanged); on a 2x2x2
    mesh the lookup is the explicit vocab-parallel one, its output is batch-sharded, and the values
    and the table gradient (which stays split like the table) equal the single-device ones."""
    from jax.sharding import Mesh, PartitionSpec

    from vlm_jax.config_defaults import DEFAULT_RULES
    from vlm_jax.layers import embeddings
    from vlm_jax.layers.embeddings import token_embedding
    from vlm_jax.parallel.rules import mesh_shardings

    ids = jax.random.randint(_key(1), (8, 6), 0, 64)
    ours = token_embedding(64, 16, name="embed")
    variables = nn.unbox(ours.init(_key(0), ids))
    flax_embed = nn.Embed(64, 16)
    assert jax.tree.structure(flax_embed.init(_key(0), ids)) == jax.tree.structure(variables)
    np.testing.assert_array_equal(ours.apply(variables, ids), flax_embed.apply(variables, ids))
    x = jax.random.normal(_key(2), (3, 16))
    np.testing.assert_allclose(
        ours.apply(variables, x, method="attend"), x @ variables["params"]["embedding"].T, rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ValueError, match="token ids must be integers"):
        ours.apply(variables, ids.astype(jnp.float32))

    def loss(v, ids):
        return jnp.sum(jnp.sin(ours.apply(v, ids)))

    expected = jax.value_and_grad(loss)(variables, ids)
    expected_rows = ours.apply(variables, ids)
    rules = [tuple(r) for r in DEFAULT_RULES]
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    shardings = mesh_shardings(jax.eval_shape(ours.init, _key(0), ids), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # The explicit vocab-parallel lookup: ids gathered over fsdp, rows summed over tensor.
        plan = embeddings._lookup_plan((64, 16), (8, 6))
        assert plan == dict(mode="ids", vocab=("tensor",), embed=("fsdp",), batch=("data", "fsdp"), gather=("fsdp",))
        # 2 rows: the batch is split over data only, so the table's columns are gathered instead.
        assert embeddings._lookup_plan((64, 16), (2, 6))["mode"] == "table"
        # More tokens per device than table rows per vocab shard: moving the table is cheaper.
        assert embeddings._lookup_plan((64, 16), (8, 128))["mode"] == "table"
        sharded = jax.device_put(variables, shardings)
        batch = jax.device_put(ids, jax.sharding.NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
        out = jax.jit(ours.apply)(sharded, batch)
        value, grads = jax.jit(jax.value_and_grad(loss))(sharded, batch)
        np.testing.assert_array_equal(jax.jit(ours.apply)(sharded, ids[:2]), expected_rows[:2])
    assert sharded["params"]["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")
    # Pure data parallelism: the table is whole on every device, jnp.take is local.
    data_only = Mesh(np.array(jax.devices()[:8]).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
    with jax.set_mesh(data_only), nn.logical_axis_rules(rules):
        assert embeddings._lookup_plan((64, 16), (8, 6)) is None
    # fsdp only: the ids are gathered over fsdp, nothing to sum over vocab; same values.
    fsdp_only = Mesh(np.array(jax.devices()[:8]).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
    fsdp_shardings = mesh_shardings(jax.eval_shape(ours.init, _key(0), ids), fsdp_only, rules)
    with jax.set_mesh(fsdp_only), nn.logical_axis_rules(rules):
        assert embeddings._lookup_plan((64, 16), (8, 6))["vocab"] == ()
        on_fsdp = jax.device_put(variables, fsdp_shardings)
        ids_fsdp = jax.device_put(ids, jax.sharding.NamedSharding(fsdp_only, PartitionSpec(("data", "fsdp"))))
        np.testing.assert_array_equal(jax.jit(ours.apply)(on_fsdp, ids_fsdp), expected_rows)
        _, fsdp_grads = jax.jit(jax.value_and_grad(loss))(on_fsdp, ids_fsdp)
    np.testing.assert_allclose(fsdp_grads["params"]["embedding"], expected[1]["params"]["embedding"], rtol=1e-5,
                               atol=1e-6)
    assert out.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(out, expected_rows)
    assert grads["params"]["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")  # never gathered
    np.testing.assert_allclose(value, expected[0], rtol=1e-5)
    np.testing.assert_allclose(grads["params"]["embedding"], expected[1]["params"]["embedding"], rtol=1e-5, atol=1e-6)
