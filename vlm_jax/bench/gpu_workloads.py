"""What each workload of the GPU report (`python -m vlm_jax.bench.gpu`) runs: the configs at full
size or `--small`, batch sizes, step counts. Shared by the JAX sections (gpu_sections) and the
PyTorch ones (torch_peers), so the three implementations of a workload always get the same model.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import ml_collections

import vlm_jax
from vlm_jax import config as config_lib
from vlm_jax.bench import lm

LLAMA_SPEC = "llama.py:tinyllama_1b"
CLIP_SPEC = "clip.py:b16"

# Full size: ANCHORS.md's runs (batch 8 x 2048 tokens; CLIP batch 256; 10 timed steps after 3).
FULL = dict(llama_batch=8, llama_length=2048, clip_batch=256, steps=10, warmup=3, decode_prompt=32,
            decode_tokens=128, decode_repeats=3, kernel_repeats=5, kernel_warmup=1)
# --small: the same code paths at toy sizes, minutes on a 2-core CPU.
SMALL = dict(llama_batch=2, llama_length=16, clip_batch=4, steps=2, warmup=1, decode_prompt=4,
             decode_tokens=8, decode_repeats=1, kernel_repeats=1, kernel_warmup=1)
# --small's ViT CLIP: b16's architecture (class token, ln_pre, quick_gelu, ...) at toy widths.
SMALL_CLIP = dict(
    image=dict(width=32, depth=2, heads=2, patch_size=8, image_size=32),
    text=dict(width=32, depth=2, heads=2, vocab_size=300, eos_id=299, context_length=12),
    embed_dim=24,
)


def configs_dir(given: str | None = None) -> str:
    """The folder of the config files: `given`, else ./configs, else the one beside the package
    (an editable install or a checkout); ConfigError when there is none (a wheel outside the repo)."""
    candidates = [given] if given else [
        "configs", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(vlm_jax.__file__))), "configs")]
    for path in candidates:
        if os.path.isfile(os.path.join(path, "llama.py")):
            return path
    raise config_lib.ConfigError(f"no config folder with llama.py at {candidates}: run from the repository "
                                 "root or pass --configs DIR")


def sizes(args: argparse.Namespace) -> dict[str, int]:
    """FULL or SMALL, with --steps / --warmup when given."""
    out = dict(SMALL if args.small else FULL)
    for key in ("steps", "warmup"):
        if getattr(args, key, None) is not None:
            out[key] = int(getattr(args, key))
    return out


def llama_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """tinyllama_1b as the device report trains it (bf16, scan_layers, remat dots); --small: tiny."""
    spec = os.path.join(configs_dir(args.configs), LLAMA_SPEC)
    return lm.load_config(spec, small=args.small, device_report=True)


def clip_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """CLIP ViT-B/16 as configs/clip.py:b16 says (bf16, scan_layers); --small: toy widths."""
    overrides: list[str] = []
    if args.small:
        for section in ("image", "text"):
            overrides += [f"model.{section}.{k}={v}" for k, v in SMALL_CLIP[section].items()]
        overrides += [f"model.embed_dim={SMALL_CLIP['embed_dim']}",
                      f"data.image_size={SMALL_CLIP['image']['image_size']}",
                      f"data.text_length={SMALL_CLIP['text']['context_length']}"]
    return config_lib.load(os.path.join(configs_dir(args.configs), CLIP_SPEC), overrides)


def train_result(impl: str, timing: dict[str, Any], size: dict[str, int], items: int, unit: str, params: int,
                 flops_per_item: float | None, **details: Any) -> dict[str, Any]:
    """One implementation's train-step result: timing + {items}/s, params, model FLOPs per item."""
    return dict(timing, impl=impl, unit=unit, items_per_step=items, steps=size["steps"], warmup=size["warmup"],
                items_per_s=items / timing["median_step_s"], params=int(params),
                flops_per_item=flops_per_item, **details)
