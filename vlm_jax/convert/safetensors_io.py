"""Reading Hugging Face weight files: safetensors only (a single file, or shards listed in
`model.safetensors.index.json`); pickled `.bin` checkpoints are refused, never unpickled."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_files(path: str) -> list[str]:
    """The safetensors files of a model directory (index shards, model.safetensors, or all)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not in {path}: {missing}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(single):
        return [single]
    found = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if found:
        return found
    pickled = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
    hint = (
        " (it holds pickled weights, which are not read: convert them to safetensors first)"
        if pickled
        else ""
    )
    raise FileNotFoundError(f"no .safetensors weights in {path}{hint}")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A model directory (or one .safetensors file) -> {name: float32 numpy array}."""
    files = [path] if os.path.isfile(path) else weight_files(path)
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        with safe_open(file, framework="np") as f:
            for key in f.keys():
                if key in tensors:
                    raise ValueError(f"weight {key!r} appears in more than one shard ({file})")
                # Our params are float32 whatever the checkpoint stored (bf16 via ml_dtypes).
                tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    return tensors
