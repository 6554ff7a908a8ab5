"""The built-in world: determinism, splits, coverage, geometry and texts."""

import collections

import numpy as np
import pytest

from vlm_jax.data import world

N = 600  # examples per check: enough to see every attribute, fast on one core


def _pairs(ex):
    return [(o["color"], o["shape"]) for o in ex["objects"]]


def _all_texts(ex):
    yield from ex["captions"]
    for qa in ex["qa"]:
        yield qa["question"]
        yield qa["answer"]
    for turn in ex["conversation"]:
        yield turn["text"]


def test_constants_and_labels():
    assert len(world.SHAPES) >= 6 and len(set(world.SHAPES)) == len(world.SHAPES)
    assert len(world.COLORS) == 8 and set(world.PALETTE) == set(world.COLORS)
    assert world.SIZES == ("small", "large")
    assert len(world.POSITIONS) == world.GRID**2
    assert world.CLASS_NAMES == [f"{c} {s}" for c in world.COLORS for s in world.SHAPES]
    for c in world.COLORS:
        for s in world.SHAPES:
            assert world.CLASS_NAMES[world.label_of(c, s)] == f"{c} {s}"
    assert all(t.count("{}") == 1 for t in world.PROMPT_TEMPLATES)
    # Palette colours must be far apart and far from the background for an exact scorer.
    palette = np.array([world.PALETTE[c] for c in world.COLORS] + [world.BACKGROUND], float)
    dist = np.linalg.norm(palette[:, None] - palette[None], axis=-1)
    assert dist[~np.eye(len(palette), dtype=bool)].min() > 90


def test_held_out_pairs_leave_every_colour_and_shape_in_training():
    held = world.HELD_OUT_PAIRS
    assert len(held) == 8 and len(set(held)) == 8
    assert sorted(c for c, _ in held) == sorted(world.COLORS)  # one per colour
    assert {s for _, s in held} == set(world.SHAPES)
    assert {c for c, _ in world.TRAIN_PAIRS} == set(world.COLORS)
    assert {s for _, s in world.TRAIN_PAIRS} == set(world.SHAPES)
    for shape in world.SHAPES:
        assert sum(s == shape for _, s in world.TRAIN_PAIRS) >= 6


def test_deterministic_from_seed_split_index():
    a = world.example(7, "train", seed=3)
    b = world.example(7, "train", seed=3)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
    differ = lambda x, y: not np.array_equal(x["image"], y["image"]) or x["captions"] != y["captions"]  # noqa: E731
    assert sum(differ(world.example(i, "train", seed=0), world.example(i, "train", seed=1)) for i in range(20)) >= 18
    assert sum(differ(world.example(i, "validation"), world.example(i, "test")) for i in range(20)) >= 18
    assert sum(differ(world.example(i, "train"), world.example(i + 1, "train")) for i in range(20)) >= 18


def test_resolutions_show_the_same_scene():
    for index in range(50):
        small = world.example(index, "test", image_size=32)
        large = world.example(index, "test", image_size=64)
        assert small["image"].shape == (32, 32, 3) and large["image"].shape == (64, 64, 3)
        assert small["image"].dtype == np.uint8
        for key in ("captions", "label", "label_name", "held_out", "qa", "conversation"):
            assert small[key] == large[key]
        for a, b in zip(small["objects"], large["objects"], strict=True):
            assert {k: v for k, v in a.items() if k != "box"} == {k: v for k, v in b.items() if k != "box"}
            # Boxes scale with the resolution, up to rasterisation.
            assert np.abs(2 * np.array(a["box"]) - np.array(b["box"])).max() <= 3


def test_train_never_shows_a_held_out_pair():
    held_names = [f"{c} {s}" for c, s in world.HELD_OUT_PAIRS]
    for index in range(N):
        ex = world.example(index, "train")
        assert not ex["held_out"]
        assert not set(_pairs(ex)) & set(world.HELD_OUT_PAIRS)
        for text in _all_texts(ex):
            assert not any(name in text for name in held_names), text


@pytest.mark.parametrize("split", ["validation", "test"])
def test_eval_splits_hold_out_about_half_of_main_objects(split):
    examples = [world.example(i, split) for i in range(N)]
    for ex in examples:
        assert ex["held_out"] == (_pairs(ex)[0] in world.HELD_OUT_PAIRS)
    fraction = np.mean([ex["held_out"] for ex in examples])
    assert 0.4 < fraction < 0.6
    assert {_pairs(ex)[0] for ex in examples} == set(world.ALL_PAIRS)
    assert world.num_examples(split) == 2000
    assert world.num_examples("train") == 50000


def test_coverage_of_attributes_and_counts():
    counts = collections.defaultdict(collections.Counter)
    for index in range(N):
        ex = world.example(index, "train")
        counts["n"][len(ex["objects"])] += 1
        counts["label"][ex["label"]] += 1
        for obj in ex["objects"]:
            for key in ("shape", "color", "size", "position"):
                counts[key][obj[key]] += 1
    assert set(counts["n"]) == {1, 2, 3}
    assert set(counts["shape"]) == set(world.SHAPES)
    assert set(counts["color"]) == set(world.COLORS)
    assert set(counts["size"]) == set(world.SIZES)
    assert set(counts["position"]) == set(world.POSITIONS)
    assert set(counts["label"]) == {world.label_of(c, s) for c, s in world.TRAIN_PAIRS}


@pytest.mark.parametrize("size", [32, 64])
def test_objects_and_boxes_match_the_pixels(size):
    background = np.array(world.BACKGROUND, np.uint8)
    for index in range(200):
        ex = world.example(index, "validation", image_size=size)
        image, objects = ex["image"], ex["objects"]
        assert 1 <= len(objects) <= 3
        assert objects[0]["size"] == "large" and all(o["size"] == "small" for o in objects[1:])
        assert ex["label"] == world.label_of(objects[0]["color"], objects[0]["shape"])
        assert ex["label_name"] == world.CLASS_NAMES[ex["label"]]
        assert len({o["position"] for o in objects}) == len(objects)
        assert len(set(_pairs(ex))) == len(objects)
        covered = np.zeros((size, size), bool)
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            patch = image[y0:y1, x0:x1]
            is_obj = (patch == np.array(world.PALETTE[obj["color"]], np.uint8)).all(-1)
            # The box is tight: every edge row and column holds the object.
            assert is_obj[0].any() and is_obj[-1].any() and is_obj[:, 0].any() and is_obj[:, -1].any()
            assert ((patch == background).all(-1) | is_obj).all()
            mask, box = world.object_mask(obj, size)
            assert box == obj["box"]
            np.testing.assert_array_equal(mask, is_obj)
            # Boxes, grown by one pixel, never touch: objects stay separate components.
            grown = (slice(max(y0 - 1, 0), y1 + 1), slice(max(x0 - 1, 0), x1 + 1))
            assert not covered[grown].any()
            covered[y0:y1, x0:x1] = True
        assert (image[~covered] == background).all()


def test_render_draws_an_example_from_its_objects():
    for index in range(20):
        for size in (32, 64):
            ex = world.example(index, "train", image_size=size)
            np.testing.assert_array_equal(world.render(ex["objects"], size), ex["image"])


def test_every_shape_renders_differently():
    for size in (32, 64):
        for scale in world.SIZES:
            objects = [{"shape": s, "size": scale, "position": "center"} for s in world.SHAPES]
            masks = [world.object_mask(obj, size)[0] for obj in objects]
            shapes = {(m.shape, m.tobytes()) for m in masks}
            assert len(shapes) == len(world.SHAPES)


def test_texts():
    for index in range(N):
        ex = world.example(index, "validation")
        main = ex["label_name"]
        assert len(ex["captions"]) >= 3 and len(set(ex["captions"])) == len(ex["captions"])
        for caption in ex["captions"]:
            assert main in caption
            assert caption.index(main) == min(caption.find(f"{c} {s}") for c, s in _pairs(ex) if f"{c} {s}" in caption)
            assert len(caption.split()) <= 14
        for caption in ex["captions"][:4]:
            for c, s in _pairs(ex):
                assert f"{c} {s}" in caption
        # The last phrasing names the main object only and counts the others.
        others = len(ex["objects"]) - 1
        for c, s in _pairs(ex)[1:]:
            assert f"{c} {s}" not in ex["captions"][4]
        if others:
            assert ex["captions"][4].startswith(f"a large {main} and {world.NUMBER_WORDS[others]} small shape")
        assert any(o["position"] in " ".join(ex["captions"]) for o in ex["objects"][:1])
        assert len(ex["qa"]) >= 4
        answers = {qa["question"]: qa["answer"] for qa in ex["qa"]}
        count_q = [q for q in answers if q.startswith("how many")]
        assert answers[count_q[0]] == world.NUMBER_WORDS[len(ex["objects"])]
        for question, answer in answers.items():
            if question.startswith("where is the "):
                name = question.removeprefix("where is the ").removesuffix("?")
                assert answer == next(o["position"] for o in ex["objects"] if f"{o['color']} {o['shape']}" == name)
            if question.startswith("is there a "):
                pair = tuple(question.removeprefix("is there a ").removesuffix("?").split(" "))
                assert answer == ("yes" if pair in _pairs(ex) else "no")
        turns = ex["conversation"]
        assert 2 <= len(turns) <= 4 and len(turns) % 2 == 0
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert all(isinstance(t["text"], str) and t["text"] for t in turns)


def test_text_corpus():
    texts = list(world.text_corpus(seed=0, num=50))
    assert texts == list(world.text_corpus(seed=0, num=50))
    assert all(isinstance(t, str) and t for t in texts)
    for name in world.CLASS_NAMES:
        assert world.PROMPT_TEMPLATES[0].format(name) in texts
    assert world.example(0, "train")["captions"][0] in texts


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        world.example(0, "dev")
    with pytest.raises(ValueError, match="shape"):
        world.render([{"shape": "hexagon", "color": "red", "size": "small", "position": "center"}], 32)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_negative_captions_bind_the_attributes_wrongly(split):
    allowed = set(world.TRAIN_PAIRS if split == "train" else world.ALL_PAIRS)
    swaps = 0
    for index in range(300):
        ex = world.example(index, split)
        rng = np.random.default_rng(index)
        negative = world.negative_scene(rng, ex["objects"], split)
        truth = [(o["color"], o["shape"]) for o in ex["objects"]]
        wrong = [(o["color"], o["shape"]) for o in negative]
        assert wrong != truth and wrong[0] != truth[0]  # the main object is always misdescribed
        assert set(wrong) <= allowed and len(set(wrong)) == len(wrong)
        assert [(o["size"], o["position"]) for o in negative] == [(o["size"], o["position"]) for o in ex["objects"]]
        colours, shapes = sorted(c for c, _ in truth), sorted(s for _, s in truth)
        if sorted(c for c, _ in wrong) == colours and sorted(s for _, s in wrong) == shapes:
            swaps += 1  # the same words, only who-has-what changed
        else:  # otherwise exactly one attribute of the main object changed
            assert wrong[1:] == truth[1:] and (wrong[0][0] == truth[0][0]) != (wrong[0][1] == truth[0][1])
        # Stored negatives are the captions of such a scene, phrasing by phrasing.
        negs = ex["negative_captions"]
        assert len(negs) == len(ex["captions"]) and not set(negs) & set(ex["captions"])
        for caption, neg in zip(ex["captions"], negs):
            assert len(caption.split()) == len(neg.split())
    multi = sum(len(world.example(i, split)["objects"]) > 1 for i in range(300))
    assert swaps >= 0.7 * multi  # most multi-object scenes get a true binding swap
