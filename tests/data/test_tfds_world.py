"""The tfds builder of the world: builds locally into array_record and reads back example()."""

import os

import grain
import numpy as np
import pytest

from vlm_jax.data import tfds_world, world

SIZES = {"train": 24, "validation": 10, "test": 10}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _assert_same(record, expected):
    np.testing.assert_array_equal(record["image"], expected["image"])
    assert record["image"].dtype == np.uint8
    for key in ("captions", "negative_captions", "label", "label_name", "held_out", "objects", "qa", "conversation"):
        assert record[key] == expected[key], key
    assert isinstance(record["label"], int) and isinstance(record["held_out"], bool)
    assert all(isinstance(c, str) for c in record["captions"])


@pytest.mark.parametrize("image_size", [32, 64])
def test_builds_locally_and_reads_back_example(data_dir, image_size):
    for split, count in SIZES.items():
        src = tfds_world.data_source(split, image_size=image_size, data_dir=data_dir, num_examples=SIZES)
        assert len(src) == count
        for index in range(count):
            record = src[index]
            assert record["index"] == index
            _assert_same(record, world.example(index, split, image_size=image_size))
    stored = os.path.join(data_dir, "vlm_world", f"s{image_size}_seed0_n24-10-10", str(tfds_world.VlmWorld.VERSION))
    assert any(".array_record-" in name for name in os.listdir(stored))


def test_seed_and_reuse(data_dir):
    src = tfds_world.data_source("train", seed=5, data_dir=data_dir, num_examples=SIZES)
    _assert_same(src[3], world.example(3, "train", seed=5))
    stored = os.path.join(data_dir, "vlm_world", "s32_seed5_n24-10-10", str(tfds_world.VlmWorld.VERSION))
    before = os.stat(os.path.join(stored, "dataset_info.json")).st_mtime_ns
    again = tfds_world.data_source("train", seed=5, data_dir=data_dir, num_examples=SIZES)
    assert os.stat(os.path.join(stored, "dataset_info.json")).st_mtime_ns == before  # not rebuilt
    _assert_same(again[3], src[3])


def test_readable_through_grain(data_dir):
    src = tfds_world.data_source("validation", data_dir=data_dir, num_examples=SIZES)
    ds = grain.MapDataset.source(src)
    assert len(ds) == SIZES["validation"]
    _assert_same(ds[4], world.example(4, "validation"))
    batch = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]}).batch(5)[0]
    assert batch["image"].shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(batch["label"], [world.example(i, "validation")["label"] for i in range(5)])


def test_builder_configs_and_features(data_dir):
    assert tfds_world.VlmWorld.name == "vlm_world"
    assert [c.name for c in tfds_world.VlmWorld.BUILDER_CONFIGS] == ["s32_seed0", "s64_seed0"]
    config = tfds_world.make_config(64, seed=2, num_examples={"train": 7})
    assert config.name == "s64_seed2_n7-2000-2000" and config.split_sizes["validation"] == 2000
    with pytest.raises(ValueError, match="unknown splits"):
        tfds_world.make_config(32, num_examples={"dev": 3})
    info = tfds_world.builder(image_size=64, data_dir=data_dir).info
    assert info.features["image"].shape == (64, 64, 3)
    assert info.features["label"].names == world.CLASS_NAMES


def test_png_round_trip():
    image = world.example(1, "test", image_size=64)["image"]
    np.testing.assert_array_equal(tfds_world.decode_png(tfds_world.encode_png(image)), image)
