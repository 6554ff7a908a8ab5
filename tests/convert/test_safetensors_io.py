"""safetensors reading: sharded indexes, dtypes, refusal of pickles."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from vlm_jax.convert.safetensors_io import read_safetensors


def test_index_shards_and_bf16(tmp_path):
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": np.ones(4, dtype=ml_dtypes.bfloat16)}, str(tmp_path / "s2.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = read_safetensors(str(tmp_path))
    assert set(tensors) == {"a", "b"}
    assert tensors["b"].dtype == np.float32 and tensors["b"].tolist() == [1.0] * 4
    np.testing.assert_array_equal(tensors["a"], np.arange(6).reshape(2, 3))


def test_duplicate_names_across_shards(tmp_path):
    for name in ("x1", "x2"):
        save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(ValueError, match="more than one shard"):
        read_safetensors(str(tmp_path))


def test_no_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        read_safetensors(str(tmp_path))


def test_diffusers_names_and_variants(tmp_path):
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    save_file({"w": np.ones(2, np.float16)}, str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"))
    assert read_safetensors(str(tmp_path))["w"].tolist() == [0.0, 0.0]  # full precision, not both files
    assert read_safetensors(str(tmp_path), variant="fp16")["w"].tolist() == [1.0, 1.0]
    with pytest.raises(FileNotFoundError, match="'bf16' variant"):
        read_safetensors(str(tmp_path), variant="bf16")
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "weights.ema.safetensors"))
    with pytest.raises(FileNotFoundError, match="variant weight files"):
        read_safetensors(str(tmp_path))
