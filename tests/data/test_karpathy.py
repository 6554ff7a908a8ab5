"""Karpathy-split files (dataset_coco.json / dataset_flickr*.json): the source, and the path from a
tiny synthetic file (and its COCO-captions twin) through the training batches and the caption
evaluator, with a corrupt image and an image without captions skipped and counted."""

import importlib.util
import json
import pathlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vlm_jax.config_defaults import base_config
from vlm_jax.data import pipeline, sources
from vlm_jax.evals import captioning


def _load_caption_eval_tests():
    # The tiny Show and Tell (model, params, world tokenizer) of the caption evaluator's tests:
    # their module-scoped `setup` fixture, reused here rather than built a second way.
    path = pathlib.Path(__file__).parents[1] / "evals" / "test_captioning_eval.py"
    spec = importlib.util.spec_from_file_location("_caption_eval_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_caption_eval = _load_caption_eval_tests()
setup = _caption_eval.setup  # a pytest fixture
METRICS = _caption_eval.METRICS

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
# (split, filepath, filename, colour or "corrupt", sentences)
ENTRIES = [
    ("train", "train2014", "COCO_train2014_000000000001.png", "red", ["a red circle", "a red square"]),
    ("train", "train2014", "COCO_train2014_000000000002.png", "blue", ["a blue square", "a blue ring"]),
    ("train", "train2014", "COCO_train2014_000000000003.png", "corrupt", ["a green ring"]),
    ("restval", "val2014", "COCO_val2014_000000000004.png", "green", ["a green ring", "a green circle"]),
    ("restval", "val2014", "COCO_val2014_000000000005.png", "yellow", []),
    ("val", "val2014", "COCO_val2014_000000000006.png", "red", ["a red ring", "a red circle"]),
    ("val", "val2014", "COCO_val2014_000000000007.png", "blue", ["a blue circle"]),
    ("test", "val2014", "COCO_val2014_000000000008.png", "green", ["a green square", "a green ring"]),
    ("test", "val2014", "COCO_val2014_000000000009.png", "corrupt", ["a red square"]),
    ("test", "val2014", "COCO_val2014_000000000010.png", "red", ["a red circle", "a red ring"]),
    ("test", "val2014", "COCO_val2014_000000000011.png", "yellow", []),
    ("test", "val2014", "COCO_val2014_000000000012.png", "blue", ["a blue square", "a blue circle"]),
]


def _write_images(root):
    rng = np.random.default_rng(0)
    for _, folder, name, colour, _ in ENTRIES:
        (root / folder).mkdir(parents=True, exist_ok=True)
        if colour == "corrupt":
            (root / folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
            continue
        pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 20, (12, 16, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(root / folder / name)


def _write_karpathy(tmp_path):
    """dataset_coco.json beside an image folder with train2014/ and val2014/; returns (json, root)."""
    root = tmp_path / "coco"
    _write_images(root)
    images = [
        {
            "filepath": folder, "filename": name, "split": split, "cocoid": 100 + i, "imgid": i,
            "sentids": list(range(10 * i, 10 * i + len(sents))),
            "sentences": [{"raw": s[0].upper() + s[1:] + ".", "tokens": s.split(), "imgid": i} for s in sents],
        }
        for i, (split, folder, name, _, sents) in enumerate(ENTRIES)
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path, root


def _write_coco(tmp_path):
    """The same images as COCO-captions files, captions_{train,test}.json (train = train + restval)."""
    root = tmp_path / "coco"
    _write_images(root)
    for split, karpathy in (("train", ("train", "restval")), ("test", ("test",))):
        rows = [(i, e) for i, e in enumerate(ENTRIES) if e[0] in karpathy]
        images = [{"id": 100 + i, "file_name": f"{folder}/{name}"} for i, (_, folder, name, _, _) in rows]
        anns = [{"image_id": 100 + i, "caption": s} for i, (_, _, _, _, sents) in rows for s in sents]
        (tmp_path / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return tmp_path / "captions_{split}.json", root


def _karpathy_config(path, root, **data):
    config = base_config()
    config.data.update(dict(source="karpathy", path=str(path), image_root=str(root), **data))
    return config


# ----------------------------------------------------------------------------- the source


def test_splits_paths_captions_and_ids(tmp_path):
    path, root = _write_karpathy(tmp_path)
    train = sources.karpathy_source(path, "train", root)
    assert len(train) == 5  # train + restval
    assert train[0] == {
        "image": str(root / "train2014" / "COCO_train2014_000000000001.png"),
        "captions": ["A red circle.", "A red square."],
        "image_id": 100,
    }
    assert train[3]["image"] == str(root / "val2014" / "COCO_val2014_000000000004.png")
    assert train[4]["captions"] == []  # kept: the pipeline counts it as an empty-caption example
    assert len(sources.karpathy_source(path, "train", root, restval=False)) == 3
    val = sources.karpathy_source(path, "validation", root)
    assert [val[i]["image_id"] for i in range(len(val))] == [105, 106]
    assert [r["image_id"] for r in sources.karpathy_source(path, "val", root)] == [105, 106]
    assert [r["image_id"] for r in sources.karpathy_source(path, "test", root)] == [107, 108, 109, 110, 111]
    with pytest.raises(ValueError, match="unknown split 'dev'.*train, validation, val, test"):
        sources.karpathy_source(path, "dev", root)


def test_flickr_style_entries(tmp_path):
    # Flickr8k/30k: no filepath, imgid only; a sentence without raw falls back to its tokens.
    path = tmp_path / "dataset_flickr8k.json"
    images = [
        {"filename": "1000268201.jpg", "split": "test", "imgid": 3,
         "sentences": [{"raw": "A child in pink .", "tokens": ["a", "child"]}, {"tokens": ["a", "dog"]}]},
        {"filename": "2.jpg", "split": "train", "imgid": 4, "sentences": [{"raw": "x"}]},
    ]
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    (record,) = sources.karpathy_source(path, "test")
    assert record == {"image": str(tmp_path / "1000268201.jpg"), "captions": ["A child in pink .", "a dog"],
                      "image_id": 3}
    assert len(sources.karpathy_source(path, "validation", "/imgs")) == 0


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "needs an 'images' list"),
        ('{"images": {"a": 1}}', "needs an 'images' list"),
        ('{"images": [{"filename": "a.jpg", "split": "test"}, {"split": "test"}]}', r"images\[1\] has no"),
        ('{"images": [{"filename": "a.jpg", "split": "test", "sentences": {}}]}', "is not a list"),
    ],
)
def test_malformed_files_name_the_file(tmp_path, text, match):
    path = tmp_path / "broken_dataset.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"broken_dataset.json.*{match}"):
        sources.karpathy_source(path, "test")


def test_the_file_is_parsed_once_per_version(tmp_path, monkeypatch):
    path, root = _write_karpathy(tmp_path)
    loads = []
    real_load = json.load
    monkeypatch.setattr(sources.json, "load", lambda f: loads.append(f.name) or real_load(f))
    train = sources.karpathy_source(path, "train", root)
    sources.karpathy_source(path, "validation", root)
    again = sources.karpathy_source(path, "train", root)
    assert len(loads) == 1 and [train[i] for i in range(5)] == [again[i] for i in range(5)]
    again[0]["captions"].append("changed")  # records are copies: the cached index is untouched
    assert sources.karpathy_source(path, "train", root)[0]["captions"] == ["A red circle.", "A red square."]
    data = json.loads(pathlib.Path(path).read_text())
    data["images"] = [img for img in data["images"] if img["split"] != "test"]
    pathlib.Path(path).write_text(json.dumps(data))  # a new version of the file is read again
    assert len(sources.karpathy_source(path, "test", root)) == 0 and len(loads) == 2


def test_make_source_and_restval_switch(tmp_path):
    path, root = _write_karpathy(tmp_path)
    config = _karpathy_config(path, root)
    assert len(sources.make_source(config, "train")) == 5
    assert len(sources.make_source(config, "test")) == 5
    config.data.karpathy_restval = False
    assert len(sources.make_source(config, "train")) == 3
    config.data.path = ""
    with pytest.raises(ValueError, match="needs config.data.path"):
        sources.make_source(config, "train")


# ----------------------------------------------------------------------------- end to end


def test_training_batches_skip_and_count_bad_examples(tmp_path, setup):
    tokenizer = setup[3]
    path, root = _write_karpathy(tmp_path)
    config = _karpathy_config(path, root, image_size=8, text_length=8, batch_size=3, shuffle=False,
                              max_bad_fraction=0.5)
    with pipeline.train_batches(config, tokenizer) as it:
        # In file order: red, blue, corrupt, green | no sentences, red, blue, corrupt, green.
        batches = [next(it) for _ in range(2)]
        stats = it.stats()
    assert stats["data/examples_seen"] == 9
    assert stats["data/skipped_bad_image"] == 2 and stats["data/skipped_empty_caption"] == 1
    for batch in batches:
        assert batch["image"].shape == (3, 8, 8, 3) and np.isfinite(batch["image"]).all()
        assert batch["tokens"].shape == (3, 8) and "label" not in batch
    red = batches[0]["image"][0].mean(axis=(0, 1))
    assert red[0] > 0.5 > red[1] and red[0] > red[2]


@pytest.mark.parametrize("fmt", ["karpathy", "coco"])
def test_caption_evaluator_on_the_test_split(tmp_path, setup, fmt):
    config, model, params, tokenizer, _ = setup
    path, root = (_write_karpathy if fmt == "karpathy" else _write_coco)(tmp_path)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.update(dict(source=fmt, path=str(path), image_root=str(root)))
    cfg = ml_collections.ConfigDict(
        dict(kinds=("caption",), split="test", num_examples=None, method="greedy", max_new_tokens=5,
             batch_size=4, baseline=True)
    )
    ev = captioning.CaptionEvaluator("test", cfg, config, model, tokenizer)
    assert ev.data["num_skipped"] == 2  # the corrupt image and the one without sentences
    assert len(ev.references) == 3 and not ev.held_out.any()
    # The baseline retrieves from train + restval: the nearest green image's first caption.
    train_first = {caps[0] for split, *_, caps in ENTRIES if split in ("train", "restval") and caps}
    assert {c.lower().rstrip(".") for c in ev.baseline_captions} <= train_first
    assert ev.baseline_captions[0].lower().startswith("a green")
    out = ev(params)
    assert set(out) == {f"test/{m}" for m in METRICS} | {f"test/baseline/{m}" for m in METRICS}
    assert all(np.isfinite(v) and 0.0 <= v <= 10.0 for v in out.values())
    assert out["test/baseline/BLEU-1"] > 0.3
    assert len(ev.last_captions) == 3


def test_tokenizer_trains_on_the_training_captions(tmp_path):
    from vlm_jax.data import tokenizer as tokenizer_lib

    path, root = _write_karpathy(tmp_path)
    config = _karpathy_config(path, root)
    config.tokenizer.vocab_size = 40
    corpus = list(tokenizer_lib._caption_corpus(config))
    # train + restval captions, not the world's text and not val/test's.
    assert corpus == ["A red circle.", "A red square.", "A blue square.", "A blue ring.", "A green ring.",
                      "A green ring.", "A green circle."]
    tok = tokenizer_lib.load_or_train(config, tmp_path / "run")
    assert tok.decode(tok.encode("a green circle.")) == "a green circle."
    assert (tmp_path / "run" / tokenizer_lib.MODEL_FILENAME).is_file()
