"""Mesh construction and logical-axis rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from vlm_jax.config_defaults import DEFAULT_RULES
from vlm_jax.parallel.mesh import make_mesh, mesh_shape
from vlm_jax.parallel.rules import batch_sharding, mesh_shardings


def test_mesh_shape_fills_minus_one():
    assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert mesh_shape({"data": -1}, 8) == (8, 1, 1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        mesh_shape({"data": -1, "model": 2}, 8)


def test_make_mesh_uses_all_devices():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.devices.size == len(jax.devices()) == 8


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        w1 = self.param("w1", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")), (8, 16))
        b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (16,))
        odd = self.param("odd", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")), (3, 5))
        return x @ w1 + b + odd.sum()


def test_param_shardings_fsdp_and_tensor():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = [list(r) for r in DEFAULT_RULES]
    boxed = jax.eval_shape(_Mlp().init, jax.random.PRNGKey(0), jnp.zeros((4, 8)))
    sh = mesh_shardings(boxed, mesh, rules)["params"]
    assert sh["w1"].spec == P("fsdp", "tensor")
    assert sh["b"].spec == P("tensor")
    # Dims that the mesh axes do not divide are replicated instead of failing.
    assert sh["odd"].spec == P(None, None)
    assert batch_sharding(mesh, rules, 4).spec == P(("data", "fsdp"), None, None, None)
