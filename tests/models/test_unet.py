"""models.unet: the diffusion UNet (shapes, timestep embedding, conditioning, logical axes, errors)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from vlm_jax import models
from vlm_jax.config_defaults import DEFAULT_RULES
from vlm_jax.models import unet
from vlm_jax.models.diffusion.blocks import timestep_embedding

B, S, L = 2, 8, 3
# A cross-attending UNet (SD layout) and a self-attention one with a pooled condition (DDPM-like).
CROSS = dict(
    name="unet", in_channels=4, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2, cross_attention_dim=8, norm_num_groups=8,
)
SELF = dict(
    CROSS, down_block_types=("AttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "AttnUpBlock2D"), mid_block_type="UNetMidBlock2D",
    num_attention_heads=(1, 4), cross_attention_dim=0, pooled_dim=6, pooled_embed_type="mlp",
    use_linear_projection=True, dropout=0.5,
)


def _model(cfg: dict, **kw) -> nn.Module:
    return models.build(ml_collections.ConfigDict({**cfg, **kw}))


def _inputs(seed: int = 0, pooled: bool = False):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, S, S, 4)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(B, L, 8)), jnp.float32)
    p = jnp.asarray(rng.normal(size=(B, 6)), jnp.float32) if pooled else None
    return x, jnp.array([10, 700], jnp.int32), context, p


def _boxed(model: nn.Module, pooled: bool = False):
    """The boxed param shapes of init, without compiling it (eval_shape)."""
    x, t, context, p = _inputs(pooled=pooled)
    return jax.eval_shape(model.init, jax.random.key(0), x, t, context, p)["params"]


@functools.cache
def _params(cfg_name: str):
    """Random params for the shapes of init (no init program to compile: the tests stay fast)."""
    model = _model(CROSS if cfg_name == "cross" else SELF)
    shapes = nn.unbox(_boxed(model, pooled=cfg_name == "self"))
    rng = np.random.default_rng(1)
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    values = [jnp.asarray(rng.normal(size=s.shape) * 0.2, jnp.float32) for s in leaves]
    return model, jax.tree_util.tree_unflatten(tree, values)


def test_forward_is_nhwc_float32_and_time_and_context_change_it():
    model, params = _params("cross")
    x, t, context, _ = _inputs()
    apply = jax.jit(lambda x, t, c: model.apply({"params": params}, x, t, c))
    out = apply(x, t, context)
    assert out.shape == (B, S, S, 3) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    # Each row follows its own timestep: changing row 1's leaves row 0 as it was.
    out_t = apply(x, jnp.array([10, 20], jnp.int32), context)
    np.testing.assert_allclose(out_t[0], out[0], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(out_t[1] - out[1]).max()) > 1e-3
    # Cross-attention: another context changes the output.
    assert float(jnp.abs(apply(x, t, context[:, ::-1] * 2.0) - out).max()) > 1e-3
    # Positional (x, t, context) is the sampler's call; a scalar timestep stands for the whole batch.
    assert jax.eval_shape(model.apply, {"params": params}, x, 5, context).shape == (B, S, S, 3)


def test_self_attention_unet_ignores_context_and_reads_pooled():
    model, params = _params("self")
    x, t, context, pooled = _inputs(pooled=True)

    @jax.jit
    def outputs(x, context, pooled, rng):
        apply = functools.partial(model.apply, {"params": params})
        return (
            apply(x, t, None, pooled),
            apply(x, t, context, pooled),
            apply(x, t, None, -pooled),
            apply(x, t, None, pooled, train=True, rngs={"dropout": rng}),
        )

    out, out_context, out_pooled, out_train = outputs(x, context, pooled, jax.random.key(1))
    assert out.shape == (B, S, S, 3)
    # No cross-attention: a context changes nothing; the pooled condition does.
    np.testing.assert_array_equal(out_context, out)
    assert float(jnp.abs(out_pooled - out).max()) > 1e-3
    # Dropout (rate 0.5) only when training, with a "dropout" rng.
    assert float(jnp.abs(out_train - out).max()) > 1e-3
    flat = traverse_util.flatten_dict(params, sep="/")
    assert not any("attn2" in k for k in flat)
    assert "mid_block/attentions_0/group_norm/scale" in flat and "mid_block/resnets_1/conv1/kernel" in flat
    assert flat["down_blocks_0/attentions_0/attention/query/kernel"].shape == (16, 1, 16)
    assert flat["down_blocks_1/attentions_0/proj_in/kernel"].shape == (32, 32)  # linear projection
    assert flat["pooled_embedding/linear_2/kernel"].shape == (64, 64)


def test_timestep_embedding_matches_the_formula():
    t = jnp.array([0, 3, 999], jnp.int32)
    for dim, flip, shift in ((8, True, 0.0), (8, False, 1.0), (7, True, 0.0)):
        half = dim // 2
        freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - shift))
        args = np.asarray(t, np.float64)[:, None] * freqs[None]
        parts = [np.cos(args), np.sin(args)] if flip else [np.sin(args), np.cos(args)]
        want = np.concatenate(parts + ([np.zeros((3, 1))] if dim % 2 else []), axis=-1)
        got = timestep_embedding(t, dim, flip, shift)
        assert got.shape == (3, dim) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, atol=2e-4)
    # Fractional timesteps work too (continuous-time samplers).
    assert timestep_embedding(jnp.array([0.5, 1.5]), 8).shape == (2, 8)


@pytest.mark.parametrize("cfg", [CROSS, SELF], ids=["cross", "self"])
def test_every_param_has_logical_axes_that_the_rules_can_map(cfg):
    boxed = _boxed(_model(cfg, dtype="bfloat16"), pooled=cfg is SELF)
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    known = {name for name, _ in DEFAULT_RULES}
    rules = dict(DEFAULT_RULES)
    for path, leaf in leaves:
        key = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), key
        assert leaf.value.dtype == jnp.float32, key  # float32 params whatever the compute dtype
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= known | {None}, (key, leaf.names)
        mesh_axes = [a for n in leaf.names if n is not None for a in np.atleast_1d(rules[n]) if a is not None]
        assert len(mesh_axes) == len(set(mesh_axes)), (key, leaf.names)  # no mesh axis used twice
        if key.endswith("['kernel']") and leaf.value.ndim == 4:
            assert leaf.names == (None, None, "conv_in", "conv_out"), key
    specs = nn.get_partition_spec(boxed)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    assert len(jax.tree_util.tree_leaves(specs, is_leaf=is_spec)) == len(leaves)


def test_bf16_compute_keeps_a_float32_output():
    model = _model(CROSS, dtype="bfloat16")
    x, t, context, _ = _inputs()
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, t, context)[0])
    assert out.shape == (B, S, S, 3) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(block_out_channels=(16, 36)), "multiple of norm_num_groups"),
        (dict(up_block_types=("UpBlock2D",)), "one of each per resolution level"),
        (dict(down_block_types=("CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D")), "not built here"),
        (dict(attention_head_dim=3), "not divisible into 3 attention heads"),
        (dict(num_attention_heads=(2, 2, 2)), "3 entries for 2 down blocks"),
        (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type"),
        (dict(only_cross_attention=True), "only_cross_attention=True is not supported"),
        (dict(upcast_attention=True), "upcast_attention=True is not supported"),
        (dict(layers_per_blok=2), "unknown keys"),
        (dict(pooled_embed_type="film"), "pooled_embed_type"),
    ],
)
def test_bad_configs_raise_clear_errors(change, message):
    with pytest.raises(ValueError, match=message):
        _model(CROSS, **change)


def test_bad_inputs_raise_clear_errors():
    model, params = _params("cross")
    x, t, context, _ = _inputs()
    variables = {"params": params}
    with pytest.raises(ValueError, match="cross-attends: pass context"):
        jax.eval_shape(model.apply, variables, x, t)
    with pytest.raises(ValueError, match="context must be"):
        jax.eval_shape(model.apply, variables, x, t, context[..., :4])
    with pytest.raises(ValueError, match="multiples of 2"):
        jax.eval_shape(model.apply, variables, x[:, :7, :7], t, context)
    with pytest.raises(ValueError, match="pooled given but pooled_dim is 0"):
        jax.eval_shape(model.apply, variables, x, t, context, jnp.zeros((B, 6)))
    self_model, self_params = _params("self")
    with pytest.raises(ValueError, match="pooled_dim=6"):
        jax.eval_shape(self_model.apply, {"params": self_params}, x, t)


def test_from_config_normalises_lists_to_tuples():
    cfg = dict(CROSS, block_out_channels=[16, 32], attention_head_dim=[2, 4])
    model = unet.from_config(ml_collections.ConfigDict(cfg))
    assert model.block_out_channels == (16, 32) and model.heads == (2, 4)
    hash(model)  # a model is a static argument of jitted samplers
