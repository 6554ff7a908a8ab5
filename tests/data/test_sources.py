"""Sources: COCO-captions JSON, JSON-lines, and the dispatch on config.data.source."""

import json
import sys
import types

import pytest

import vlm_jax.data
from vlm_jax.config_defaults import base_config
from vlm_jax.data import sources


def _write_coco(path, images, annotations):
    path.write_text(json.dumps({"images": images, "annotations": annotations}))


def test_coco_groups_captions_per_image(tmp_path):
    ann = tmp_path / "captions.json"
    _write_coco(
        ann,
        [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "sub/b.png"}, {"id": 11, "file_name": "c.png"}],
        [
            {"image_id": 9, "caption": "b one"},
            {"image_id": 7, "caption": " a one "},
            {"image_id": 9, "caption": "b two"},
            {"image_id": 7, "caption": None},
        ],
    )
    src = sources.coco_source(ann, tmp_path / "imgs")
    assert len(src) == 3
    assert src[0] == {"image": str(tmp_path / "imgs" / "a.jpg"), "captions": ["a one", ""], "image_id": 7}
    assert src[1]["captions"] == ["b one", "b two"]
    assert src[1]["image"] == str(tmp_path / "imgs" / "sub" / "b.png")
    assert src[2]["captions"] == []  # kept: the pipeline counts it as an empty-caption example
    # Without image_root, paths are relative to the annotation file.
    assert sources.coco_source(ann)[0]["image"] == str(tmp_path / "a.jpg")


def test_coco_rejects_other_json(tmp_path):
    ann = tmp_path / "x.json"
    ann.write_text("[1, 2]")
    with pytest.raises(ValueError, match="COCO"):
        sources.coco_source(ann)


def test_jsonl_groups_lines_of_the_same_image(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"image": "x.png", "caption": "first"}),
        json.dumps({"image": "/abs/y.png", "caption": "why"}),
        "{not json",
        "",
        json.dumps({"image": "x.png", "caption": "second"}),
        json.dumps({"caption": "no image"}),
        json.dumps({"image": "z.png", "caption": ["l1", "l2"]}),
    ]
    path.write_text("\n".join(lines) + "\n")
    src = sources.jsonl_source(path, tmp_path)
    assert [r["image"] for r in (src[i] for i in range(len(src)))] == [
        str(tmp_path / "x.png"), "/abs/y.png", str(tmp_path / "z.png"),
    ]
    assert src[0]["captions"] == ["first", "second"]
    assert src[2]["captions"] == ["l1", "l2"]
    assert src.malformed_lines == 2
    src[0]["captions"].append("mutated")  # records handed out are copies
    assert src[0]["captions"] == ["first", "second"]


def test_make_source_dispatch(tmp_path):
    config = base_config()
    (tmp_path / "train.jsonl").write_text(json.dumps({"image": "a.png", "caption": "t"}) + "\n")
    _write_coco(tmp_path / "val.json", [{"id": 1, "file_name": "v.png"}], [{"image_id": 1, "caption": "v"}])
    config.data.source = "jsonl"
    config.data.path = str(tmp_path / "{split}.jsonl")
    assert sources.make_source(config, "train")[0]["captions"] == ["t"]
    config.data.source = "coco"
    config.data.path = str(tmp_path / "val.json")
    config.data.image_root = "/images/{split}"
    assert sources.make_source(config, "validation")[0]["image"] == "/images/validation/v.png"
    config.data.path = ""
    with pytest.raises(ValueError, match="config.data.path"):
        sources.make_source(config, "train")
    config.data.source = "laion"
    with pytest.raises(ValueError, match="unknown config.data.source 'laion'"):
        sources.make_source(config, "train")


def test_world_source_passes_config_to_tfds_world(monkeypatch):
    calls = []
    fake = types.ModuleType("vlm_jax.data.tfds_world")
    fake.data_source = lambda split, **kw: calls.append((split, kw)) or ["record"]
    monkeypatch.setitem(sys.modules, "vlm_jax.data.tfds_world", fake)
    monkeypatch.setattr(vlm_jax.data, "tfds_world", fake, raising=False)
    config = base_config()
    config.data.world_seed, config.data.image_size = 5, 24
    config.data.world_num_examples.validation = 64
    assert sources.make_source(config, "validation") == ["record"]
    split, kw = calls[0]
    sizes = dict(kw.pop("num_examples"))
    assert (split, kw) == ("validation", dict(image_size=24, seed=5, data_dir=None))
    assert sizes == dict(train=50000, validation=64, test=2000)
    config.data.tfds_data_dir = "/tmp/tfds"
    sources.world_source(config, "train")
    assert calls[-1][1]["data_dir"] == "/tmp/tfds"
