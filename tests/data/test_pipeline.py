"""Pipeline: image loading/conversion, preprocessing, shuffling, sharding, exact resume, bad data."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from vlm_jax.config_defaults import base_config
from vlm_jax.data import pipeline, sources, world
from vlm_jax.data.errors import DataError
from vlm_jax.data.tokenizer import Tokenizer

S = 8


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    texts = ["a red circle", "a blue square and a green ring", "caption number one two three"] * 30
    return Tokenizer.train(texts, str(tmp_path_factory.mktemp("tok") / "spm"), vocab_size=64)


def _config(batch_size=4, **data):
    config = base_config()
    config.data.update({**dict(image_size=S, text_length=8, batch_size=batch_size), **data})
    return config


def _fake_source(n=16, size=S):
    """Records with label == index, so a batch's labels say which examples it holds."""
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "captions": [f"a red circle {i}", "a blue square", "a green ring"],
            "label": i,
        }
        for i in range(n)
    ]


def _take(it, k):
    return [next(it) for _ in range(k)]


# ----------------------------------------------------------------------------- load_image


def _png(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_load_image_converts_modes():
    gray = Image.fromarray(np.full((5, 6), 77, np.uint8), "L")
    out = pipeline.load_image(_png(gray))
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8 and (out == 77).all()

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[0, 0, 3] = 0  # transparent pixel -> black
    out = pipeline.load_image(_png(Image.fromarray(rgba, "RGBA")))
    assert out[1, 1].tolist() == [200, 0, 0] and out[0, 0].tolist() == [0, 0, 0]

    deep = np.array([[0, 257 * 10], [65535, 257 * 128]], np.uint16)
    out = pipeline.load_image(_png(Image.fromarray(deep)))  # a 16-bit grayscale PNG
    assert out[..., 0].tolist() == [[0, 10], [255, 128]]

    pal = Image.fromarray(np.full((3, 3, 3), (10, 20, 30), np.uint8)).convert("P", palette=Image.ADAPTIVE)
    assert pipeline.load_image(_png(pal))[1, 1].tolist() == [10, 20, 30]

    jpeg = pipeline.load_image(_png(Image.new("RGB", (16, 12), (0, 128, 255)), "JPEG"))
    assert jpeg.shape == (12, 16, 3) and abs(int(jpeg[6, 8, 1]) - 128) < 4


def test_load_image_arrays():
    assert pipeline.load_image(np.ones((3, 3), np.uint16) * 65535).max() == 255
    assert pipeline.load_image(np.full((2, 2, 3), 0.5, np.float32))[0, 0, 0] == 128
    assert pipeline.load_image(np.zeros((2, 2, 1), np.uint8)).shape == (2, 2, 3)
    assert pipeline.load_image(np.zeros((2, 2, 5), np.uint8)) is None


def test_load_image_bad_inputs_return_none(tmp_path):
    good = _png(Image.new("RGB", (8, 8)))
    (tmp_path / "empty.png").write_bytes(b"")
    assert pipeline.load_image(good[: len(good) // 2]) is None  # truncated
    assert pipeline.load_image(b"definitely not an image") is None
    assert pipeline.load_image(b"") is None
    assert pipeline.load_image(str(tmp_path / "missing.png")) is None
    assert pipeline.load_image(str(tmp_path / "empty.png")) is None
    assert pipeline.load_image(None) is None


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_normalises_and_resizes():
    config = _config(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    images = np.zeros((2, 12, 16, 3), np.uint8)
    images[1] = 255
    out = pipeline.preprocess_images(images, config)
    assert out.shape == (2, S, S, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], [-1.0, -1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(out[1, 0, 0], [1.0, 3.0, 1.0], atol=1e-5)


def test_preprocess_augments_only_in_train():
    config = _config(random_flip=True, random_crop=True)
    images = np.random.default_rng(1).integers(0, 256, (6, S, S, 3), dtype=np.uint8)
    plain = pipeline.preprocess_images(images, config)
    np.testing.assert_array_equal(plain, pipeline.preprocess_images(images, config, train=False, rng=3))
    np.testing.assert_allclose(plain, images / 127.5 - 1.0, atol=1e-6)
    assert not np.allclose(plain, pipeline.preprocess_images(images, config, train=True, rng=3))
    config.data.random_crop = False  # flip alone: every image is itself or its mirror
    flipped = pipeline.preprocess_images(images, config, train=True, rng=4)
    mirror = plain[:, :, ::-1]
    same = [np.array_equal(f, p) or np.array_equal(f, m) for f, p, m in zip(flipped, plain, mirror)]
    assert all(same)
    config.data.random_flip = False
    np.testing.assert_array_equal(plain, pipeline.preprocess_images(images, config, train=True, rng=4))


# ----------------------------------------------------------------------------- train batches


def test_batches_shapes_and_tokens(tok):
    it = pipeline.train_batches(_config(), tok, source=_fake_source())
    batch = next(it)
    assert batch["image"].shape == (4, S, S, 3) and batch["image"].dtype == np.float32
    assert batch["tokens"].shape == (4, 8) and batch["tokens"].dtype == np.int32
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (4,)
    assert (batch["tokens"][:, 0] == tok.bos_id).all() and (batch["tokens"] == tok.eos_id).any(1).all()
    assert it.stats()["data/examples_seen"] == 4
    with pytest.raises(ValueError, match="divisible"):
        pipeline.train_batches(_config(batch_size=6), tok, process_count=4, source=_fake_source())


def test_shuffle_is_seeded_and_changes_per_epoch(tok):
    src = _fake_source()
    labels = lambda it, k: np.concatenate([b["label"] for b in _take(it, k)])  # noqa: E731
    first = labels(pipeline.train_batches(_config(), tok, source=src, seed=1), 8)
    again = labels(pipeline.train_batches(_config(), tok, source=src, seed=1), 8)
    other = labels(pipeline.train_batches(_config(), tok, source=src, seed=2), 8)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    epoch1, epoch2 = first[:16], first[16:]
    assert sorted(epoch1) == sorted(epoch2) == list(range(16))  # each epoch sees every example once
    assert not np.array_equal(epoch1, epoch2)
    ordered = labels(pipeline.train_batches(_config(shuffle=False), tok, source=src), 4)
    np.testing.assert_array_equal(ordered, np.arange(16))


def test_per_host_shards_are_disjoint_and_cover_the_epoch(tok):
    src, config = _fake_source(), _config(batch_size=8)
    seen = []
    for host in range(2):
        it = pipeline.train_batches(config, tok, process_index=host, process_count=2, source=src)
        batches = _take(it, 2)  # 2 batches of 4 = this host's 8 examples = one epoch
        assert all(b["image"].shape[0] == 4 for b in batches)
        seen.append({int(label) for b in batches for label in b["label"]})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(16))


def test_resume_is_exact(tok):
    config = _config(random_crop=True, random_flip=True)
    src = _fake_source(n=13, size=12)
    it = pipeline.train_batches(config, tok, source=src, seed=5)
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = _take(it, 5)
    resumed = pipeline.train_batches(config, tok, source=src, seed=5)
    next(resumed)  # a trainer may have consumed a batch before it restores
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 5)):
        for key in ("image", "tokens", "label"):
            np.testing.assert_array_equal(want[key], got[key])
    assert resumed.stats() == it.stats()


def test_world_examples_flow_through(tok):
    src = sources.RecordSource([world.example(i, "train") for i in range(12)])  # 32 px -> S
    batch = next(pipeline.train_batches(_config(), tok, source=src))
    assert batch["image"].shape == (4, S, S, 3) and batch["label"].max() < len(world.CLASS_NAMES)


# ----------------------------------------------------------------------------- real files


def _file_dataset(tmp_path):
    """A COCO folder with good, convertible and broken examples; returns the annotations path."""
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    files = {}
    for i in range(6):
        files[f"good{i}.jpg"] = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    files["gray.png"] = Image.fromarray(np.full((10, 10), 90, np.uint8), "L")
    files["rgba.png"] = Image.fromarray(np.full((10, 10, 4), 200, np.uint8), "RGBA")
    files["deep.png"] = Image.fromarray(np.full((10, 10), 40000, np.uint16))
    for name, img in files.items():
        img.save(root / name)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    names = list(files) + ["corrupt.jpg", "missing.png", "nocaption.png"]
    files["nocaption.png"] = files["gray.png"]
    files["nocaption.png"].save(root / "nocaption.png")
    images = [{"id": i, "file_name": n} for i, n in enumerate(names)]
    anns = [{"image_id": i, "caption": f"photo {n} " + ("long " * 20 if n == "good0.jpg" else "")}
            for i, n in enumerate(names) if n != "nocaption.png"]
    anns.append({"image_id": names.index("nocaption.png"), "caption": "   "})
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path, root


def test_bad_files_are_skipped_and_counted(tmp_path, tok):
    ann, root = _file_dataset(tmp_path)
    config = _config(batch_size=3, max_bad_fraction=0.5, shuffle=False, text_length=48)
    src = sources.coco_source(ann, root)
    it = pipeline.train_batches(config, tok, source=src)
    batches = _take(it, 4)  # an epoch of 12 (9 usable, then the 3 bad) + 3 of the next
    stats = it.stats()
    assert stats["data/examples_seen"] == 15
    assert stats["data/skipped_bad_image"] == 2  # corrupt + missing
    assert stats["data/skipped_empty_caption"] == 1
    assert stats["data/converted_images"] == 3  # gray, rgba, 16-bit
    assert stats["data/truncated_captions"] == 2  # the long caption, once per epoch
    images = np.concatenate([b["image"] for b in batches[:3]])
    assert images.shape == (9, S, S, 3) and np.isfinite(images).all()
    assert "label" not in batches[0]
    # Gray and 16-bit come through as equal-channel RGB at the right level.
    np.testing.assert_allclose(images[6], 90 / 127.5 - 1, atol=1e-5)
    np.testing.assert_allclose(images[8], round(40000 / 257) / 127.5 - 1, atol=1e-5)


def test_too_many_bad_examples_raise(tmp_path, tok):
    ann, root = _file_dataset(tmp_path)
    it = pipeline.train_batches(_config(batch_size=3), tok, source=sources.coco_source(ann, root))
    with pytest.raises(DataError, match="max_bad_fraction"):
        _take(it, 5)


def test_one_bad_first_example_does_not_abort(tok):
    src = _fake_source(n=40)
    src[0] = {**src[0], "image": b"junk"}
    it = pipeline.train_batches(_config(shuffle=False), tok, source=src)
    assert next(it)["label"].tolist() == [1, 2, 3, 4]  # bad 1/1 so far, but below the minimum seen
    all_bad = [{**r, "image": b"junk"} for r in src]
    it = pipeline.train_batches(_config(max_bad_fraction=1.0), tok, source=all_bad)
    with pytest.raises(DataError):  # never loops forever on a source with nothing usable
        next(it)


# ----------------------------------------------------------------------------- eval data


def test_eval_data_is_deterministic_and_unaugmented(tmp_path, tok):
    ann, root = _file_dataset(tmp_path)
    config = _config(random_crop=True, random_flip=True)
    src = sources.coco_source(ann, root)
    data = pipeline.eval_data(config, "validation", 20, tok, source=src)
    again = pipeline.eval_data(config, "validation", 20, tok, source=src)
    np.testing.assert_array_equal(data["image"], again["image"])
    assert data["image"].shape == (9, S, S, 3) and data["num_skipped"] == 3
    assert data["index"].tolist() == list(range(9))
    assert data["tokens"].shape == (9, 8) and data["caption_owner"].tolist() == list(range(9))
    assert pipeline.eval_data(config, "validation", 4, tok, source=src)["index"].tolist() == [0, 1, 2, 3]
    assert data["captions"][0][0].startswith("photo good0.jpg")

    config.data.image_size = 32
    world_src = [world.example(i, "validation", image_size=32) for i in range(6)]
    data = pipeline.eval_data(config, "validation", 4, tok, source=world_src)
    n_caps = sum(len(c) for c in data["captions"])
    assert data["tokens"].shape == (n_caps, 8) and data["caption_owner"].shape == (n_caps,)
    assert data["label"].tolist() == [r["label"] for r in world_src[:4]]
    assert data["held_out"].dtype == bool and data["held_out"].shape == (4,)
    assert data["image"].shape == (4, 32, 32, 3)
    np.testing.assert_allclose(data["image"][0], world_src[0]["image"] / 127.5 - 1, atol=1e-6)


@pytest.mark.slow
def test_worker_processes_resume_exactly_and_match_in_process(tok):
    config = _config(num_workers=2)
    src = _fake_source(n=20)
    with pipeline.train_batches(config, tok, source=src) as it:
        _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        want = _take(it, 3)
    with pipeline.train_batches(config, tok, source=src) as again:
        again.set_state(state)
        got = _take(again, 3)
    config.data.num_workers = 0
    with pipeline.train_batches(config, tok, source=src) as local:
        same = _take(local, 6)[3:]
    for w, g, s in zip(want, got, same):
        np.testing.assert_array_equal(w["image"], g["image"])
        np.testing.assert_array_equal(w["image"], s["image"])
        np.testing.assert_array_equal(w["tokens"], s["tokens"])


def test_state_from_another_host_count_still_resumes(tok, caplog):
    src = _fake_source()
    it = pipeline.train_batches(_config(), tok, source=src)
    _take(it, 2)
    other = pipeline.train_batches(_config(), tok, source=src, process_index=1, process_count=2)
    other.set_state(it.get_state())  # 8 examples on 1 host -> 4 per host on 2
    assert other.get_state()["iterator"]["next_index"] == 4
    assert "will not be exactly" in caplog.text
    assert next(other)["label"].shape == (2,)


def test_hard_negatives_come_with_their_captions(tok):
    src = sources.RecordSource([world.example(i, "train") for i in range(12)])
    config = _config(hard_negatives=True, shuffle=False, text_length=24)
    batch = next(pipeline.train_batches(config, tok, source=src))
    assert batch["negative_tokens"].shape == batch["tokens"].shape == (4, 24)
    for row in range(4):  # unshuffled: row i is example i
        ex = world.example(row, "train")
        caps, negs = (tok.tokenize(ex[k], 24) for k in ("captions", "negative_captions"))
        picked = [j for j in range(len(caps)) if (caps[j] == batch["tokens"][row]).all()]
        # The negative is the one written for the caption that was picked.
        assert picked and any((negs[j] == batch["negative_tokens"][row]).all() for j in picked)
    assert "negative_tokens" not in next(pipeline.train_batches(_config(), tok, source=src))
    with pytest.raises(ValueError, match="negative_captions"):
        pipeline.train_batches(_config(hard_negatives=True), tok, source=_fake_source())


def test_records_without_a_usable_negative_are_skipped_and_counted(tok):
    src = [{**r, "negative_captions": ["wrong one", "wrong two", "wrong three"]} for r in _fake_source(n=40)]
    src[1] = {**src[1], "negative_captions": ["", " ", ""]}
    it = pipeline.train_batches(_config(hard_negatives=True, shuffle=False), tok, source=src)
    assert next(it)["label"].tolist() == [0, 2, 3, 4]
    assert it.stats()["data/skipped_no_negative"] == 1
