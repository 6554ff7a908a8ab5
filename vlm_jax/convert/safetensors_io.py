"""Reading Hugging Face weight files: safetensors only (a single file, or shards listed in an index
json), under transformers' names (`model.safetensors`) or diffusers' (`diffusion_pytorch_model.
safetensors`); pickled `.bin` checkpoints are refused, never unpickled. A folder that holds several
precisions of one model (diffusers' variants, `diffusion_pytorch_model.fp16.safetensors`) is read
at the full-precision files, or at the variant asked for."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from safetensors import safe_open

STEMS = ("model", "diffusion_pytorch_model")  # transformers', diffusers'
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _named(stem: str, variant: str | None, suffix: str) -> str:
    return f"{stem}.{variant}{suffix}" if variant else f"{stem}{suffix}"


def weight_files(path: str, variant: str | None = None) -> list[str]:
    """The safetensors files of a model directory: an index's shards or a single file under one of
    STEMS (with `variant`: e.g. `diffusion_pytorch_model.fp16.safetensors`), else every
    *.safetensors when they are of one model (not several variants)."""
    for stem in STEMS:
        index = os.path.join(path, _named(stem, variant, ".safetensors.index.json"))
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are not in {path}: {missing}")
            return [os.path.join(path, f) for f in files]
        single = os.path.join(path, _named(stem, variant, ".safetensors"))
        if os.path.exists(single):
            return [single]
    if variant:
        raise FileNotFoundError(f"no {variant!r} variant of the weights in {path}")
    found = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    variants = {os.path.basename(f).split(".")[-2] for f in found if os.path.basename(f).count(".") > 1}
    if variants:
        raise FileNotFoundError(
            f"{path} holds variant weight files ({sorted(variants)}) and no {' or '.join(STEMS)} "
            ".safetensors: name the variant to read")
    if found:
        return found
    pickled = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
    hint = (
        " (it holds pickled weights, which are not read: convert them to safetensors first)"
        if pickled
        else ""
    )
    raise FileNotFoundError(f"no .safetensors weights in {path}{hint}")


def read_safetensors(path: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """A model directory (or one .safetensors file) -> {name: float32 numpy array}."""
    files = [path] if os.path.isfile(path) else weight_files(path, variant)
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        with safe_open(file, framework="np") as f:
            for key in f.keys():
                if key in tensors:
                    raise ValueError(f"weight {key!r} appears in more than one shard ({file})")
                # Our params are float32 whatever the checkpoint stored (bf16 via ml_dtypes).
                tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    return tensors
