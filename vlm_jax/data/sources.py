"""Random-access data sources: the built-in world, COCO-captions JSON, Karpathy-split JSON, JSON-lines.

    config.data.source = "karpathy"          # or "coco" | "jsonl" | "world"
    config.data.path = "/data/dataset_coco.json"
    config.data.image_root = "/data/coco"    # holds train2014/ and val2014/

Every source has `len()` and `[i]` -> dict record {"image": bytes | np.ndarray | path,
"captions": list[str], optional "label", "held_out", ...}. File-backed sources hold paths only:
images are read (and their failures counted) in the pipeline's map step, not here.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

SOURCES = ("world", "coco", "karpathy", "jsonl")
# Our split names -> the `split` values of a Karpathy file's images. "restval" (the 30,504 COCO
# val2014 images in neither val nor test) joins train unless config.data.karpathy_restval is False.
KARPATHY_SPLITS = {"train": ("train", "restval"), "validation": ("val",), "val": ("val",), "test": ("test",)}


class RecordSource:
    """A list of records behind the random-access interface grain expects (len, getitem)."""

    def __init__(self, records: Sequence[dict[str, Any]], name: str = "records"):
        self._records = list(records)
        self.name = name

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._records[index]
        # A shallow copy with a fresh caption list: pipeline steps must not mutate the source.
        return {**record, "captions": list(record["captions"])}

    def __repr__(self) -> str:
        return f"RecordSource({self.name}, {len(self)} records)"


def world_source(config: Any, split: str) -> Any:
    """The built-in world split as a tfds array_record source (built on first use)."""
    from vlm_jax.data import tfds_world  # late: tensorflow-datasets is slow to import

    data = config.data
    return tfds_world.data_source(
        split,
        image_size=int(data.image_size),
        seed=int(data.world_seed),
        data_dir=str(data.get("tfds_data_dir", "") or "") or None,
        num_examples=data.get("world_num_examples"),
    )


def coco_source(annotations_json: str | os.PathLike, image_root: str | os.PathLike = "") -> RecordSource:
    """COCO captions (images[].id/file_name, annotations[].image_id/caption), one record per image."""
    annotations_json = os.fspath(annotations_json)
    with open(annotations_json, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{annotations_json!r} is not COCO captions JSON (needs images, annotations)")
    root = _image_root(annotations_json, image_root)
    captions: dict[Any, list[str]] = {}
    for ann in data["annotations"]:
        captions.setdefault(ann["image_id"], []).append(_as_text(ann.get("caption")))
    records = []
    for img in data["images"]:
        records.append(
            {
                "image": _resolve(root, img["file_name"]),
                # An image without annotations stays in, with no caption: the pipeline counts it
                # as an empty-caption example instead of it vanishing silently.
                "captions": captions.get(img["id"], []),
                "image_id": img["id"],
            }
        )
    return RecordSource(records, name=os.path.basename(annotations_json))


def karpathy_source(
    dataset_json: str | os.PathLike, split: str, image_root: str | os.PathLike = "", restval: bool = True
) -> RecordSource:
    """One split of Karpathy's dataset_coco.json / dataset_flickr8k.json / dataset_flickr30k.json.

    The file is {"images": [{"filepath"?, "filename", "split", "sentences": [{"raw", "tokens"}],
    "cocoid" | "imgid"}], "dataset"}. Split "train" is train + restval (the usual 113,287 COCO
    training images; restval=False: train alone), "validation" / "val" is val and "test" is test
    (5,000 COCO images each). Records: image = image_root/filepath/filename (Flickr files have no
    filepath), captions = the raw sentences, image_id = cocoid, else imgid. Images of other splits
    are left out; an image without sentences stays in for the pipeline to count.
    """
    dataset_json = os.fspath(dataset_json)
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"unknown split {split!r} for a Karpathy file; choose one of {', '.join(KARPATHY_SPLITS)}")
    wanted = set(KARPATHY_SPLITS[split])
    if not restval:
        wanted.discard("restval")
    stat = os.stat(dataset_json)
    index = _karpathy_index(os.path.abspath(dataset_json), stat.st_mtime_ns, stat.st_size)
    root = _image_root(dataset_json, image_root)
    records = [
        {"image": _resolve(root, file), "captions": list(captions), "image_id": image_id}
        for file, img_split, captions, image_id in index
        if img_split in wanted
    ]
    if not records:
        log.warning("%s: no images in split %r (%s)", dataset_json, split, "+".join(sorted(wanted)))
    return RecordSource(records, name=f"{os.path.basename(dataset_json)}:{split}")


@functools.lru_cache(maxsize=2)
def _karpathy_index(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, str, tuple[str, ...], Any], ...]:
    """(filepath/filename, split, raw sentences, image id) of every image of a Karpathy file.

    Parsed once per file version (path, mtime, size): a run reads its train split for training,
    the tokenizer and the caption baseline and its val split for the evaluator. The index keeps
    what the records need, not the file's token lists, which are most of its size.
    """
    del mtime_ns, size  # cache key only
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path!r} is not a Karpathy split file (not JSON: {e})") from e
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{path!r} is not a Karpathy split file (needs an 'images' list)")
    index = []
    for i, img in enumerate(images):
        if not isinstance(img, dict) or not isinstance(img.get("filename"), str) or "split" not in img:
            raise ValueError(f"{path!r}: images[{i}] has no 'filename' and 'split'")
        sentences = img.get("sentences")
        sentences = [] if sentences is None else sentences
        if not isinstance(sentences, list):
            raise ValueError(f"{path!r}: images[{i}]['sentences'] is not a list")
        index.append((
            os.path.join(str(img.get("filepath") or ""), img["filename"]),
            img["split"],
            tuple(_sentence_text(s) for s in sentences),
            img.get("cocoid", img.get("imgid")),
        ))
    return tuple(index)


def jsonl_source(path: str | os.PathLike, image_root: str | os.PathLike = "") -> RecordSource:
    """JSON-lines {"image": path, "caption": text}; lines of the same image become one record."""
    path = os.fspath(path)
    root = _image_root(path, image_root)
    by_image: dict[str, list[str]] = {}  # dicts keep first-seen order: the file's order
    malformed = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = row["image"]
            except (json.JSONDecodeError, KeyError, TypeError):
                malformed += 1
                if malformed <= 5:
                    log.warning("%s:%d: not a {'image': ..., 'caption': ...} line, skipped", path, line_no)
                continue
            caption = row.get("caption", row.get("captions", ""))
            texts = caption if isinstance(caption, list) else [caption]
            by_image.setdefault(_resolve(root, image), []).extend(_as_text(t) for t in texts)
    if malformed:
        log.warning("%s: %d malformed lines skipped", path, malformed)
    records = [{"image": image, "captions": caps} for image, caps in by_image.items()]
    source = RecordSource(records, name=os.path.basename(path))
    source.malformed_lines = malformed
    return source


def make_source(config: Any, split: str) -> Any:
    """The source named by config.data.source ('world' | 'coco' | 'karpathy' | 'jsonl') for a split.

    coco and jsonl read config.data.path with '{split}' replaced by the split name; karpathy reads
    the one file that lists every split (config.data.karpathy_restval: restval in train or not).
    """
    kind = str(config.data.source)
    if kind == "world":
        return world_source(config, split)
    if kind not in SOURCES:
        raise ValueError(f"unknown config.data.source {kind!r}; choose one of {', '.join(SOURCES)}")
    path = str(config.data.path or "")
    if not path:
        raise ValueError(f"config.data.source={kind!r} needs config.data.path (the {kind} file)")
    # One config covers several splits when the path names them: 'captions_{split}.json'.
    path = os.path.expanduser(path.replace("{split}", split))
    image_root = os.path.expanduser(str(config.data.get("image_root", "") or "").replace("{split}", split))
    if kind == "coco":
        return coco_source(path, image_root)
    if kind == "karpathy":
        return karpathy_source(path, split, image_root, bool(config.data.get("karpathy_restval", True)))
    return jsonl_source(path, image_root)


def _image_root(annotation_path: str, image_root: str | os.PathLike) -> str:
    """Relative image paths resolve against image_root, or the annotation file's folder if unset."""
    root = os.fspath(image_root)
    return root if root else os.path.dirname(os.path.abspath(annotation_path))


def _resolve(root: str, file_name: str) -> str:
    return file_name if os.path.isabs(file_name) else os.path.join(root, file_name)


def _sentence_text(sentence: Any) -> str:
    """A Karpathy sentence {"raw", "tokens"} -> its raw text (its tokens joined if raw is missing)."""
    if isinstance(sentence, str):
        return _as_text(sentence)
    if not isinstance(sentence, dict):
        return ""
    raw = sentence.get("raw")
    if isinstance(raw, str):
        return _as_text(raw)
    tokens = sentence.get("tokens")
    return " ".join(t for t in tokens if isinstance(t, str)) if isinstance(tokens, list) else ""


def _as_text(caption: Any) -> str:
    # A null or non-string caption is treated as empty, so the pipeline counts it, not crashes.
    return caption.strip() if isinstance(caption, str) else ""
