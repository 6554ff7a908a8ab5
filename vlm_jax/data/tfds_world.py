"""The built-in world as a tensorflow-datasets builder: generated locally, stored as array_record.

Nothing is downloaded and TensorFlow is not needed: images are handed to tfds as PNG bytes,
the nested texts (objects, qa, conversation) are stored as JSON, and records are read back
with `builder.as_data_source()` into plain Python dicts shaped like `world.example()`.

    src = data_source("train", image_size=32)       # builds ~/.cache/vlm_jax/tfds on first use
    ds = grain.MapDataset.source(src).shuffle(seed=0).batch(...)
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from vlm_jax.data import world

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "vlm_jax", "tfds")
_JSON_KEYS = ("objects", "qa", "conversation")


@dataclasses.dataclass(eq=False)
class VlmWorldConfig(tfds.core.BuilderConfig):
    """Rendering resolution, world seed and examples per split of one stored copy of the world."""

    image_size: int = 32
    seed: int = 0
    split_sizes: dict[str, int] = dataclasses.field(default_factory=lambda: dict(world.SPLIT_SIZES))


def make_config(image_size: int = 32, seed: int = 0, num_examples: dict[str, int] | None = None) -> VlmWorldConfig:
    """A config whose name encodes everything that changes the stored records."""
    sizes = dict(world.SPLIT_SIZES)
    # .items() rather than dict(): a ConfigDict from a run config is accepted too.
    sizes.update({str(k): int(v) for k, v in (num_examples or {}).items()})
    unknown = set(sizes) - set(world.SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected {world.SPLITS}")
    name = f"s{image_size}_seed{seed}"
    # Non-default sizes get their own directory, so a tiny test copy never shadows the full one.
    if sizes != world.SPLIT_SIZES:
        name += "_n" + "-".join(str(sizes[s]) for s in world.SPLITS)
    return VlmWorldConfig(
        name=name,
        description=f"{image_size}x{image_size} renderings of world seed {seed}, split sizes {sizes}.",
        image_size=image_size,
        seed=seed,
        split_sizes=sizes,
    )


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [S, S, 3] image."""
    buffer = io.BytesIO()
    # Fast compression: the images are tiny and flat, higher levels buy little and cost time.
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """uint8 [S, S, 3] image from PNG bytes."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


class VlmWorld(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for the built-in synthetic world (vlm_jax.data.world)."""

    VERSION = tfds.core.Version("1.3.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "negative_captions (hard negatives).",
        "1.2.0": "A caption phrasing that names only the main object.",
        "1.3.0": "A second main-object phrasing: 'the large shape is a red circle.'.",
    }
    BUILDER_CONFIGS = [make_config(32), make_config(64)]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file; tfds's own lookup needs `importlib_resources`, absent on Python >= 3.9."""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "index": np.int64,
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "negative_captions": tfds.features.Sequence(tfds.features.Text()),
                "label": tfds.features.ClassLabel(names=world.CLASS_NAMES),
                "label_name": tfds.features.Text(),
                "held_out": np.bool_,
                # Nested lists of dicts as JSON: tfds sequences of dicts need TensorFlow to decode.
                "objects": tfds.features.Text(),
                "qa": tfds.features.Text(),
                "conversation": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            # Record i must be world.example(i): readers rely on it, and Grain shuffles anyway.
            disable_shuffling=True,
            homepage="https://github.com/vlm_jax/vlm_jax",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # Everything is generated locally.
        return {split: self._generate_examples(split) for split in world.SPLITS}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        config = self.builder_config
        for index in range(config.split_sizes[split]):
            ex = world.example(index, split, seed=config.seed, image_size=config.image_size)
            yield index, {
                "index": index,
                # PNG bytes rather than an array: encoding arrays goes through TensorFlow.
                "image": encode_png(ex["image"]),
                "captions": ex["captions"],
                "negative_captions": ex["negative_captions"],
                "label": ex["label"],
                "label_name": ex["label_name"],
                "held_out": ex["held_out"],
                **{key: json.dumps(ex[key]) for key in _JSON_KEYS},
            }


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _from_record(record: dict[str, Any]) -> dict[str, Any]:
    """A decoded tfds record as a dict shaped like world.example() (plus its index)."""
    image = record["image"]
    if isinstance(image, bytes):
        image = decode_png(image)
    out = {
        "index": int(record["index"]),
        "image": np.asarray(image, np.uint8),
        "captions": [_text(c) for c in record["captions"]],
        "negative_captions": [_text(c) for c in record["negative_captions"]],
        "label": int(record["label"]),
        "label_name": _text(record["label_name"]),
        "held_out": bool(record["held_out"]),
    }
    for key in _JSON_KEYS:
        out[key] = json.loads(_text(record[key]))
    for obj in out["objects"]:
        obj["box"] = tuple(obj["box"])
    return out


class WorldSource:
    """Random-access view of one split: len() and [i] -> dict like world.example(i)."""

    def __init__(self, source: Any):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _from_record(self._source[int(index)])

    def __repr__(self) -> str:
        return f"WorldSource({self._source!r})"


def builder(
    *, image_size: int = 32, seed: int = 0, data_dir: str | None = None, num_examples: dict[str, int] | None = None
) -> VlmWorld:
    """The VlmWorld builder for these settings (not yet prepared)."""
    config = make_config(image_size, seed, num_examples)
    # tfds refuses a new config object that reuses a predefined name; pass the name instead.
    predefined = {c.name for c in VlmWorld.BUILDER_CONFIGS}
    return VlmWorld(
        config=config.name if config.name in predefined else config,
        data_dir=os.path.expanduser(data_dir or DEFAULT_DATA_DIR),
        file_format="array_record",
    )


def prepare(
    *, image_size: int = 32, seed: int = 0, data_dir: str | None = None, num_examples: dict[str, int] | None = None
) -> VlmWorld:
    """Generate and store the dataset unless it already is; returns the prepared builder."""
    b = builder(image_size=image_size, seed=seed, data_dir=data_dir, num_examples=num_examples)
    if not b.is_prepared():
        # Statistics would decode every record again and only feed the catalog.
        b.download_and_prepare(
            download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP),
            file_format="array_record",
        )
    return b


def data_source(
    split: str,
    *,
    image_size: int = 32,
    seed: int = 0,
    data_dir: str | None = None,
    num_examples: dict[str, int] | None = None,
) -> WorldSource:
    """Random-access source of a split, building the dataset on first use; [i] -> example dict."""
    b = prepare(image_size=image_size, seed=seed, data_dir=data_dir, num_examples=num_examples)
    return WorldSource(b.as_data_source(split=split))
