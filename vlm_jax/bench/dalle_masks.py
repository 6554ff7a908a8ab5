"""How many attention tiles DALL-E's static masks let our kernels skip, at their default tiles.

    python -m vlm_jax.bench.dalle_masks [--text-len 256] [--grid 32] [--head-dim 64]
        [--dtype bfloat16|float16|float32]

Counts only, no timing and no device: for each mask kind (`kernels.attention.masks.DalleMask`)
and each kernel tiling (pallas_gpu's forward, dk/dv and dq tiles from `default_tiles`, or its
whole-row `short_tiles` for short sequences; pallas_tpu's default block, used by all three of its
kernels), the tiles that are EMPTY (skipped: no loads, no compute), PARTIAL (masked in-kernel) and
FULL (mask-free), and the fraction skipped against a schedule that visits every tile and against
plain causal. The defaults are the 12B model's layout: 256 text + 32 x 32 image tokens, head_dim 64.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax.numpy as jnp

from vlm_jax.kernels.attention import pallas_gpu, pallas_tpu
from vlm_jax.kernels.attention.masks import skipped_table


def default_blocks(seq_len: int, head_dim: int, dtype: Any) -> dict[str, tuple[int, int]]:
    """{tiling name: (block_q, block_k)} of the kernels' defaults for a self-attention of seq_len.

    The GPU tiles are clamped to the sequence as `pallas_gpu.mha` clamps them; the TPU block is the
    one `pallas_tpu.mha` picks (block_q and block_k alike, as q_len == kv_len).
    """
    gpu = pallas_gpu.short_tiles(head_dim, dtype, seq_len, seq_len, heads=1, groups=1)
    gpu = gpu or pallas_gpu.default_tiles(head_dim, dtype)

    def clamp(block: int) -> int:
        return pallas_gpu._clamp_block(block, seq_len)

    tpu = pallas_tpu._block_size(seq_len, None, pallas_tpu.NUM_LANES, head_dim, "block_q")
    return {
        "gpu fwd": (clamp(gpu.block_q), clamp(gpu.block_k)),
        "gpu dkv": (clamp(gpu.block_q_dkv), clamp(gpu.block_k_dkv)),
        "gpu dq": (clamp(gpu.block_q_dq), clamp(gpu.block_k_dq)),
        "tpu": (tpu, tpu),
    }


def main(argv: list[str] | None = None) -> str:
    """Parse `argv`, print the table and return it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text-len", type=int, default=256)
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    args = parser.parse_args(argv)
    seq_len = args.text_len + args.grid**2
    table = skipped_table(args.text_len, args.grid, default_blocks(seq_len, args.head_dim, jnp.dtype(args.dtype)))
    print(table)
    return table


if __name__ == "__main__":
    main()
