"""Input pipeline on grain: per-host shard, seeded shuffle per epoch, decode/augment, tokenise, batch.

    it = train_batches(config, tokenizer, process_index=jax.process_index(),
                       process_count=jax.process_count())
    batch = next(it)          # {"image": f32 [b,S,S,3], "tokens": i32 [b,L], "label": i32 [b]}
    state = it.get_state()    # JSON-able; it.set_state(state) resumes on exactly the next batch
    it.close()                # stops reader threads / worker processes (config.data.num_workers)

Per example (grain map, in reader threads): read and convert the image, pick a caption, crop/flip.
Per batch (consumer): drop bad examples (counted), stack, normalise and tokenise in one go.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import grain.python as grain
import numpy as np
from PIL import Image, ImageOps

from vlm_jax.data import sources as sources_lib
from vlm_jax.data.errors import DataError
from vlm_jax.data.normalise import denormalise, normalise  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

COUNTERS = (
    "data/examples_seen",
    "data/skipped_bad_image",
    "data/skipped_empty_caption",
    "data/skipped_no_negative",
    "data/converted_images",
    "data/truncated_captions",
    "data/batches",
)
# The bad-fraction limit is only enforced after this many examples (or one epoch, if smaller):
# one corrupt file among the first few must not abort a run that is otherwise fine.
MIN_EXAMPLES_FOR_BAD_CHECK = 200
# Reader threads per host: two overlap decoding with the train step; more only fight over the GIL.
READ_THREADS = 2
_CROP_MIN_SCALE = 0.8  # random resized crop keeps 80-100% of the (square) image area
_STATE_VERSION = 1


# ----------------------------------------------------------------------------- images


def load_image(obj: Any) -> np.ndarray | None:
    """Bytes / path / array / PIL image -> uint8 [H,W,3] RGB, or None when it cannot be read."""
    return _load_image(obj)[0]


def _load_image(obj: Any, draft: int | None = None) -> tuple[np.ndarray | None, bool]:
    """Like load_image, plus whether a conversion (mode, bit depth, alpha) was needed."""
    try:
        if isinstance(obj, np.ndarray):
            return _array_to_rgb(obj)
        if isinstance(obj, Image.Image):
            return _pil_to_rgb(obj)
        if isinstance(obj, (bytes, bytearray, memoryview)):
            if len(obj) == 0:
                return None, False
            f: Any = io.BytesIO(obj)
        elif isinstance(obj, (str, os.PathLike)):
            f = os.fspath(obj)
        else:
            return None, False
        with Image.open(f) as img:
            if draft and img.format == "JPEG":
                # Decode big JPEGs at a reduced scale (still >= the target size): far cheaper.
                img.draft(img.mode, (draft, draft))
            img.load()
            img = ImageOps.exif_transpose(img)
            return _pil_to_rgb(img)
    except Exception:  # noqa: BLE001 - image decoders raise anything on junk; all mean "unusable"
        return None, False


def _pil_to_rgb(img: Image.Image) -> tuple[np.ndarray | None, bool]:
    """PIL image of any mode -> (uint8 [H,W,3], converted)."""
    if img.width == 0 or img.height == 0:
        return None, False
    if img.mode == "RGB":
        return np.asarray(img), False
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        # High bit depth (16-bit PNG opens as I;16 or I): scale to 8 bits instead of clipping.
        return _array_to_rgb(np.asarray(img))[0], True
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        img.mode == "P" and "transparency" in img.info
    ):
        return _array_to_rgb(np.asarray(img.convert("RGBA")))[0], True
    return np.asarray(img.convert("RGB")), True


def _array_to_rgb(arr: np.ndarray) -> tuple[np.ndarray | None, bool]:
    """Array [H,W], [H,W,1|2|3|4] of any numeric dtype -> (uint8 [H,W,3], converted)."""
    arr = np.asarray(arr)
    converted = False
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr, converted = arr[..., 0], True
    if arr.ndim not in (2, 3) or arr.size == 0 or (arr.ndim == 3 and arr.shape[-1] not in (2, 3, 4)):
        return None, False
    if arr.dtype != np.uint8:
        arr, converted = _to_uint8(arr), True
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1), True
    if arr.shape[-1] in (2, 4):
        # Composite on black: the colour where opaque, fading to black where transparent.
        alpha = arr[..., -1:].astype(np.uint16)
        colour = arr[..., :-1].astype(np.uint16)
        rgb = ((colour * alpha + 127) // 255).astype(np.uint8)
        return (np.repeat(rgb, 3, axis=-1) if rgb.shape[-1] == 1 else rgb), True
    return arr, converted


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Rescales 16-bit ints and [0,1] floats to 0..255; other ints are clipped."""
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float32))
        if arr.max(initial=0.0) <= 1.0:
            arr = arr * 255.0
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    wide = arr.astype(np.int64)
    if arr.dtype.itemsize >= 2 and wide.max(initial=0) > 255:
        wide = (wide + 128) // 257  # 65535 -> 255 exactly
    return np.clip(wide, 0, 255).astype(np.uint8)


def _fit(
    image: np.ndarray, size: int, rng: np.random.Generator | None = None, crop: bool = False
) -> np.ndarray:
    """uint8 [H,W,3] -> uint8 [size,size,3]: a square crop (centre, or random when crop) resized."""
    h, w = image.shape[:2]
    side = min(h, w)
    if crop and rng is not None:
        side = max(1, int(round(side * math.sqrt(rng.uniform(_CROP_MIN_SCALE, 1.0)))))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    else:
        if h == w == size:
            return image  # the common case of the built-in world: nothing to do
        top, left = (h - side) // 2, (w - side) // 2
    box = (left, top, left + side, top + side)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC, box=box))


def preprocess_images(
    images: np.ndarray | Sequence[Any],
    config: Any,
    *,
    rng: np.random.Generator | int | None = None,
    train: bool = False,
) -> np.ndarray:
    """Images (uint8 [N,H,W,3] or a list of arrays/paths/bytes) -> float32 [N,S,S,3], normalised.

    Resizes to config.data.image_size (centre square crop), and only when train: random resized
    crop / horizontal flip as config.data.random_crop / random_flip ask.
    """
    size = int(config.data.image_size)
    crop = bool(train and config.data.random_crop)
    flip = bool(train and config.data.random_flip)
    gen = np.random.default_rng(rng) if (crop or flip) else None
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, obj in enumerate(images):
        image = load_image(obj)
        if image is None:
            raise ValueError(f"image {i} cannot be read")
        out[i] = _fit(image, size, gen, crop)
    if flip:
        mask = gen.random(len(out)) < 0.5
        out[mask] = out[mask, :, ::-1]
    return normalise(out, config)


# ----------------------------------------------------------------------------- examples


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


class _Prepare:
    """grain map_with_index step: source index -> {"image" uint8 [S,S,3], "caption", ...} or a bad marker.

    The record is read here, not by a grain source: grain would walk every (nested) record to
    estimate its size, which costs more than the rest of the step. Randomness comes from
    (seed, host, index in the host's stream), so it differs per epoch and is identical after a
    resume. A class, not a closure, so that grain's worker processes can pickle it.
    """

    def __init__(
        self, source: Any, size: int, seed: int, host: int, crop: bool, flip: bool, negatives: bool = False
    ):
        self.source = source
        self.size, self.seed, self.host, self.crop, self.flip = size, seed, host, crop, flip
        self.negatives = negatives

    def __call__(self, index: int, source_index: int) -> dict[str, Any]:
        record = self.source[int(source_index)]
        captions = [c for c in record.get("captions", ()) if _is_text(c)]
        what = record.get("image") if isinstance(record.get("image"), str) else f"#{source_index}"
        if not captions:
            return {"status": "empty_caption", "what": str(what)}
        if self.negatives:
            # negative_captions[i] belongs to captions[i]: keep the pairs where both are usable.
            negs = list(record.get("negative_captions") or ())
            raw = list(record.get("captions", ()))
            pairs = [(c, n) for c, n in zip(raw, negs) if _is_text(c) and _is_text(n)]
            if not pairs:
                return {"status": "no_negative", "what": str(what)}
            captions, negs = [c for c, _ in pairs], [n for _, n in pairs]
        draft = int(math.ceil(self.size / math.sqrt(_CROP_MIN_SCALE))) if self.crop else self.size
        image, converted = _load_image(record.get("image"), draft=draft)
        if image is None:
            return {"status": "bad_image", "what": str(what)}
        rng = np.random.default_rng((self.seed, self.host, index))
        image = _fit(image, self.size, rng, self.crop)
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        pick = int(rng.integers(len(captions))) if len(captions) > 1 else 0
        out = {"status": "converted" if converted else "ok", "image": image, "caption": captions[pick]}
        if self.negatives:
            out["negative_caption"] = negs[pick]
        if "label" in record:
            out["label"] = int(record["label"])
        return out


class TrainIterator:
    """Infinite iterator over this host's batches, with a JSON-able state for exact resume."""

    def __init__(
        self,
        dataset: grain.IterDataset,
        *,
        tokenizer: Any,
        config: Any,
        batch_size: int,
        epoch_length: int,
        has_label: bool,
        layout: dict[str, int],
        negatives: bool = False,
    ):
        self._dataset = dataset
        self._it = iter(dataset)
        self._tokenizer = tokenizer
        self._config = config
        self._batch_size = batch_size
        self._text_length = int(config.data.text_length)
        self._max_bad = float(config.data.max_bad_fraction)
        self._min_seen = min(MIN_EXAMPLES_FOR_BAD_CHECK, epoch_length)
        self._epoch_length = epoch_length
        self._has_label = has_label
        self._negatives = negatives
        self._layout = layout  # what a saved state must agree with to resume exactly
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._recent_bad: list[str] = []

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The next batch: image f32 [b,S,S,3], tokens i32 [b,L], label i32 [b] (if labelled).

        With hard negatives, also negative_tokens i32 [b,L]: row i is a wrong caption of image i.
        """
        images, captions, labels, negatives = [], [], [], []
        bad_run = 0
        counts = self._counts
        while len(images) < self._batch_size:
            ex = next(self._it)
            counts["data/examples_seen"] += 1
            status = ex["status"]
            if status in ("bad_image", "empty_caption", "no_negative"):
                counts[f"data/skipped_{status}"] += 1
                self._recent_bad = (self._recent_bad + [f"{status}: {ex['what']}"])[-5:]
                bad_run += 1
                self._check_bad(bad_run)
                continue
            counts["data/converted_images"] += status == "converted"
            images.append(ex["image"])
            captions.append(ex["caption"])
            if self._negatives:
                negatives.append(ex["negative_caption"])
            if self._has_label:
                labels.append(ex.get("label", -1))
        self._check_bad(0)
        tokens, truncated = self._tokenizer.tokenize(
            captions, self._text_length, return_truncated=True
        )
        counts["data/truncated_captions"] += int(truncated.sum())
        counts["data/batches"] += 1
        batch = {"image": normalise(np.stack(images), self._config), "tokens": tokens}
        if self._negatives:
            batch["negative_tokens"] = self._tokenizer.tokenize(negatives, self._text_length)
        if self._has_label:
            batch["label"] = np.asarray(labels, np.int32)
        return batch

    def _check_bad(self, bad_run: int) -> None:
        """Raises DataError when unusable examples exceed config.data.max_bad_fraction."""
        seen = self._counts["data/examples_seen"]
        bad = sum(self._counts[k] for k in COUNTERS if k.startswith("data/skipped_"))
        # A whole epoch without one usable example would otherwise loop forever.
        hopeless = bad_run >= self._epoch_length
        if hopeless or (seen >= self._min_seen and bad > self._max_bad * seen):
            raise DataError(
                f"{bad} of {seen} examples were unusable ({bad / max(seen, 1):.1%}), more than "
                f"config.data.max_bad_fraction={self._max_bad}; counts: {self.stats()}; "
                f"last bad: {self._recent_bad}"
            )

    def close(self) -> None:
        """Stops reader threads / worker processes (grain's own teardown at exit is noisy)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        # Drop the grain objects now, while their modules still exist: their __del__ at
        # interpreter exit prints tracebacks.
        self._it = self._dataset = None

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        """Cumulative counters since the start of the run (restored with the state)."""
        return dict(self._counts)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position + counters; set_state(it) resumes at exactly the next batch."""
        return {
            "version": _STATE_VERSION,
            "iterator": self._it.get_state(),
            "counts": dict(self._counts),
            "layout": dict(self._layout),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a state from get_state (of this or an identically configured iterator)."""
        if state.get("version") != _STATE_VERSION:
            raise DataError(f"data iterator state version {state.get('version')} is not supported")
        inner = dict(state["iterator"])
        saved = state.get("layout", {})
        if saved and saved != self._layout:
            if saved.get("process_count") != self._layout["process_count"] and "next_index" in inner:
                # Another host count: keep the global number of examples consumed, approximately.
                done = inner["next_index"] * saved["process_count"]
                inner["next_index"] = done // self._layout["process_count"]
            log.warning(
                "data state was saved with %s, resuming with %s: the batches will not be "
                "exactly those of the original run", saved, self._layout,
            )
        self._it.set_state(inner)
        self._counts = {k: int(state.get("counts", {}).get(k, 0)) for k in COUNTERS}


def train_batches(
    config: Any,
    tokenizer: Any,
    *,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
    source: Any = None,
) -> TrainIterator | Any:
    """This host's infinite stream of batches of config.data.batch_size // process_count examples.

    `source` overrides make_source(config, "train") (any object with len and getitem -> record).
    Text-only sources (data.text.SOURCES) give language-model batches (data.text.train_batches).
    """
    from vlm_jax.data import text

    if config.data.source in text.SOURCES:
        return text.train_batches(
            config, tokenizer, process_index=process_index, process_count=process_count, seed=seed, source=source
        )
    batch_size = int(config.data.batch_size)
    if batch_size % process_count:
        raise ValueError(f"data.batch_size {batch_size} is not divisible by {process_count} hosts")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    seed = int(config.seed if seed is None else seed)
    source = sources_lib.make_source(config, "train") if source is None else source
    n = len(source)
    # Equal shards keep hosts in the same epoch; at most process_count - 1 examples are dropped.
    per_host = n // process_count
    if per_host == 0:
        raise DataError(f"the training source has {n} examples, fewer than {process_count} hosts")
    ds = grain.MapDataset.range(per_host * process_count)[process_index::process_count]
    if config.data.shuffle:
        ds = ds.seed(seed).shuffle()  # grain reshuffles every epoch (seed + epoch)
    negatives = bool(config.data.get("hard_negatives", False))
    if negatives and "negative_captions" not in source[0]:
        raise ValueError(
            f"data.hard_negatives=True needs records with 'negative_captions' (the built-in world "
            f"has them); the {config.data.source!r} source {source!r} has none"
        )
    prepare = _Prepare(
        source, int(config.data.image_size), seed, process_index,
        bool(config.data.random_crop), bool(config.data.random_flip), negatives,
    )
    ds = ds.repeat().map_with_index(prepare)
    workers = int(config.data.get("num_workers", 0))
    # About two batches ahead, capped so that big images at big batches do not hold gigabytes.
    buffer = min(1024, max(64, 2 * (batch_size // process_count)))
    read = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=buffer)
    iter_ds = ds.to_iter_dataset(read)
    if workers > 0:
        from absl import flags  # grain's worker processes read absl flags, parsed or not

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()  # defaults only: a library must not consume sys.argv
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return TrainIterator(
        iter_ds,
        tokenizer=tokenizer,
        config=config,
        batch_size=batch_size // process_count,
        epoch_length=per_host,
        has_label="label" in source[0],
        negatives=negatives,
        layout=dict(
            seed=seed, process_index=process_index, process_count=process_count,
            batch_size=batch_size, num_examples=n, shuffle=int(bool(config.data.shuffle)),
            hard_negatives=int(negatives),
        ),
    )


def eval_data(
    config: Any,
    split: str,
    num_examples: int | None,
    tokenizer: Any,
    *,
    source: Any = None,
) -> dict[str, Any]:
    """The first num_examples usable examples of a split, unaugmented, as whole arrays.

    Returns image f32 [N,S,S,3]; captions list[list[str]] (empty ones dropped); tokens i32 [T,L]
    for all captions flattened in order, with caption_owner i32 [T] = the image row of each;
    index i32 [N] (position in the split); label i32 [N], held_out bool [N], objects (per image,
    the world's object dicts with their pixel boxes) and num_objects i32 [N] when the source has
    them; num_skipped (unusable examples passed over to reach N).
    """
    source = sources_lib.make_source(config, split) if source is None else source
    want = len(source) if num_examples is None else min(int(num_examples), len(source))
    size = int(config.data.image_size)
    images, captions, index, labels, held_out, objects_of = [], [], [], [], [], []
    skipped = 0
    for i in range(len(source)):
        if len(images) >= want:
            break
        record = source[i]
        caps = [c for c in record.get("captions", ()) if isinstance(c, str) and c.strip()]
        image = load_image(record.get("image")) if caps else None
        if image is None:
            skipped += 1
            continue
        images.append(_fit(image, size))
        captions.append(caps)
        index.append(i)
        labels.append(record.get("label"))
        held_out.append(record.get("held_out"))
        objects_of.append(record.get("objects"))
    if skipped:
        log.info("eval split %s: skipped %d unusable examples", split, skipped)
    if not images:
        raise DataError(f"split {split!r} has no usable examples")
    flat = [c for caps in captions for c in caps]
    out: dict[str, Any] = {
        "image": normalise(np.stack(images), config),
        "captions": captions,
        "tokens": tokenizer.tokenize(flat, int(config.data.text_length)),
        "caption_owner": np.repeat(np.arange(len(captions), dtype=np.int32),
                                   [len(c) for c in captions]),
        "index": np.asarray(index, np.int32),
        "num_skipped": skipped,
    }
    if all(v is not None for v in labels):
        out["label"] = np.asarray(labels, np.int32)
    if all(v is not None for v in held_out):
        out["held_out"] = np.asarray(held_out, bool)
    if all(v is not None for v in objects_of):
        out["num_objects"] = np.asarray([len(v) for v in objects_of], np.int32)
        out["objects"] = objects_of
    return out
