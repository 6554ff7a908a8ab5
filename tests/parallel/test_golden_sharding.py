"""Golden sharding: every param's shape and mesh PartitionSpec, per model config, under the config's
own sharding rules on a (data=2, fsdp=2, tensor=2) mesh, against a checked-in snapshot.

A change in sharding (a rule, a logical axis name in a model, a param added or renamed) fails here
and shows up as a diff of tests/parallel/golden/*.json in review. When the change is intended:

    VLM_JAX_UPDATE_GOLDEN=1 pytest tests/parallel/test_golden_sharding.py

rewrites the snapshots (then look at `git diff tests/parallel/golden`).
Nothing is allocated: the shapes come from jax.eval_shape through the trainer's state_initializer.
"""

import os

import jax
import pytest

from vlm_jax.parallel import golden

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="the golden mesh needs 8 (fake) devices")

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
UPDATE = os.environ.get("VLM_JAX_UPDATE_GOLDEN", "") not in ("", "0", "false", "False")
SHOW = 25  # changed params listed in a failure message
REGENERATE = f"VLM_JAX_UPDATE_GOLDEN=1 pytest {os.path.relpath(__file__)}"

CONFIGS = {
    "configs/clip.py": ("tiny", "rn50", "b32", "b16", "l14"),
    "configs/vit.py": ("tiny", "b16", "l16", "h14"),
    "configs/gan_int_cls.py": ("tiny", "tiny_char", "published"),
    "configs/dalle.py": ("tokenizer_tiny", "tokenizer_tiny_vq", "tokenizer", "tiny", "12b"),
    "configs/ddpm.py": ("tiny", "published"),
    "configs/ldm.py": ("tiny", "sd15"),
    # tiny holds upsample1_tiny whole, and upsample2_published the published decoder and upsample1.
    "configs/unclip.py": ("prior_tiny", "decoder_tiny", "tiny", "published", "upsample2_published"),
    "configs/llama.py": (
        "tiny", "llama_7b", "llama2_7b", "llama2_13b", "llama2_70b", "llama3_8b", "tinyllama_1b"
    ),
}
SPECS = [f"{path}:{variant}" for path, variants in CONFIGS.items() for variant in variants]

_tables = {}


def _table(spec):
    if spec not in _tables:
        _tables[spec] = golden.param_table(golden.golden_config(spec))
    return _tables[spec]


def _golden_path(spec):
    path, variant = spec.split(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(GOLDEN_DIR, f"{name}_{variant}.json")


@pytest.mark.parametrize("spec", SPECS)
def test_param_shardings_match_the_snapshot(spec):
    table = _table(spec)
    path = _golden_path(spec)
    if UPDATE:
        os.makedirs(GOLDEN_DIR, exist_ok=True)
        with open(path, "w") as f:
            f.write(golden.to_json(table))
        return
    if not os.path.exists(path):
        pytest.fail(f"no snapshot {os.path.relpath(path)}; write it with {REGENERATE}")
    with open(path) as f:
        expected = golden.from_json(f.read())
    changes = golden.diff(expected, table)
    if changes:
        shown = "\n  ".join(changes[:SHOW])
        more = f"\n  ... and {len(changes) - SHOW} more" if len(changes) > SHOW else ""
        pytest.fail(
            f"{spec}: the sharding of {len(changes)} of {len(table)} params differs from "
            f"{os.path.relpath(path)}:\n  {shown}{more}\nIf intended, regenerate: {REGENERATE}",
            pytrace=False,
        )


def test_no_stale_snapshots():
    """Every snapshot belongs to a config tested here (a removed variant takes its file along)."""
    expected = {os.path.basename(_golden_path(spec)) for spec in SPECS}
    present = {f for f in os.listdir(GOLDEN_DIR) if f.endswith(".json")} if os.path.isdir(GOLDEN_DIR) else set()
    assert present <= expected, f"snapshots without a config: {sorted(present - expected)}"


def test_snapshot_diff_names_the_changed_params():
    table = _table("configs/llama.py:tiny")
    moved = dict(table)
    shape, spec = moved["layers_0/mlp/up/kernel"]
    moved["layers_0/mlp/up/kernel"] = (shape, [None, "tensor"])
    del moved["final_norm/scale"]
    lines = golden.diff(table, moved)
    assert lines == [
        "final_norm/scale: snapshot (128,) P('fsdp') -> now (absent)",
        "layers_0/mlp/up/kernel: snapshot (128, 344) P('fsdp', 'tensor') -> now (128, 344) P(None, 'tensor')",
    ]
    assert golden.from_json(golden.to_json(table)) == table


@pytest.mark.parametrize(
    "spec, min_tensor",
    [
        ("configs/llama.py:llama2_7b", 0.999),
        ("configs/llama.py:llama2_70b", 0.999),
        ("configs/clip.py:l14", 0.99),
        # The 21843-class head (classes: no rule; and odd) stays whole over `tensor`.
        ("configs/vit.py:h14", 0.95),
    ],
)
def test_fsdp_shards_almost_every_byte(spec, min_tensor):
    table = _table(spec)
    assert golden.sharded_fraction(table, "fsdp") > 0.99
    assert golden.sharded_fraction(table, "tensor") > min_tensor
    # Params are never split over `data` (pure replicas there).
    assert golden.sharded_fraction(table, "data") == 0.0


def test_llama2_7b_tensor_parallel_splits_heads_and_mlp():
    table = _table("configs/llama.py:llama2_7b")
    # Scanned layers: [layers, embed, heads, head_dim] / [layers, heads, head_dim, embed].
    assert table["layers/attn/query/kernel"] == ([32, 4096, 32, 128], [None, "fsdp", "tensor", None])
    assert table["layers/attn/key/kernel"] == ([32, 4096, 32, 128], [None, "fsdp", "tensor", None])
    assert table["layers/attn/out/kernel"] == ([32, 32, 128, 4096], [None, "tensor", None, "fsdp"])
    assert table["layers/mlp/gate/kernel"] == ([32, 4096, 11008], [None, "fsdp", "tensor"])
    assert table["layers/mlp/down/kernel"] == ([32, 11008, 4096], [None, "tensor", "fsdp"])
    assert table["embed/embedding"] == ([32000, 4096], ["tensor", "fsdp"])
    assert table["lm_head/kernel"] == ([4096, 32000], ["fsdp", "tensor"])


def test_grouped_kv_heads_split_over_tensor_when_they_divide():
    # llama2_70b: 8 kv heads, 2-way tensor axis: split like the query heads.
    table = _table("configs/llama.py:llama2_70b")
    assert table["layers/attn/key/kernel"] == ([80, 8192, 8, 128], [None, "fsdp", "tensor", None])
    assert table["layers/attn/query/kernel"][1] == [None, "fsdp", "tensor", None]


def test_dims_the_mesh_does_not_divide_are_replicated():
    # ViT-H/14 at 224: 16x16 patches + cls = 257 positions, odd: the position dim stays whole.
    table = _table("configs/vit.py:h14")
    odd = {name: entry for name, entry in table.items() if 257 in entry[0]}
    assert odd, "expected the position embedding of 257 tokens"
    for shape, spec in odd.values():
        assert spec[shape.index(257)] is None
