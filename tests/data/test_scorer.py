"""The scorer reads the world's renderings back into their objects and judges other images."""

import numpy as np
import pytest
from scipy import ndimage

from vlm_jax.data import scorer, world


def _strip(objects):
    return [{k: o[k] for k in ("shape", "color", "size", "position")} for o in objects]


@pytest.mark.parametrize("size", [32, 64])
def test_reads_its_own_renderings(size):
    examples = [world.example(i, split, image_size=size) for split in ("train", "test") for i in range(250)]
    results = [scorer.score(ex["image"], ex["objects"]) for ex in examples]
    assert np.mean([r["all_correct"] for r in results]) >= 0.99
    # In fact exact: same objects, same boxes.
    for ex, r in zip(examples, results):
        expected = sorted((tuple(o["box"]), tuple(_strip([o])[0].items())) for o in ex["objects"])
        found = sorted((tuple(o["box"]), tuple(_strip([o])[0].items())) for o in r["found"])
        assert found == expected


def test_every_object_kind_in_every_cell():
    for size in (32, 64):
        for shape in world.SHAPES:
            for scale in world.SIZES:
                for position in world.POSITIONS:
                    obj = {"shape": shape, "color": "cyan", "size": scale, "position": position}
                    (found,) = scorer.read_objects(world.render([obj], size))
                    assert _strip([found]) == [obj]


@pytest.mark.parametrize("size,sigma,blur,floor", [(32, 12, 0.0, 0.97), (32, 8, 0.5, 0.9), (64, 20, 0.7, 0.95)])
def test_degrades_gracefully_on_noise_and_blur(size, sigma, blur, floor):
    rng = np.random.default_rng(0)
    correct, colors = [], []
    for index in range(150):
        ex = world.example(index, "validation", image_size=size)
        image = ex["image"].astype(np.float32)
        if blur:
            image = ndimage.gaussian_filter(image, (blur, blur, 0))
        image = np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)
        result = scorer.score(image, ex["objects"])
        correct.append(result["all_correct"])
        colors.append(result["color_acc"])
    assert np.mean(correct) >= floor
    assert np.mean(colors) >= 0.98


def test_tolerates_a_different_background():
    ex = world.example(3, "test", image_size=64)
    image = ex["image"].copy()
    background = (image == np.array(world.BACKGROUND, np.uint8)).all(-1)
    image[background] = (40, 35, 30)
    assert scorer.score(image, ex["objects"])["all_correct"]


def test_scores_wrong_images_as_wrong():
    scene = [
        {"shape": "circle", "color": "red", "size": "large", "position": "top left"},
        {"shape": "square", "color": "blue", "size": "small", "position": "center"},
    ]
    image = world.render(scene, 32)
    assert scorer.score(image, scene)["all_correct"]

    recoloured = [dict(scene[0], color="green"), scene[1]]
    r = scorer.score(image, recoloured)
    assert not r["all_correct"] and not r["main_correct"] and r["color_acc"] == 0.5 and r["shape_acc"] == 1.0

    reshaped = [scene[0], dict(scene[1], shape="ring")]
    r = scorer.score(image, reshaped)
    assert not r["all_correct"] and r["main_correct"] and r["shape_acc"] == 0.5

    moved = [dict(scene[0], position="bottom right"), scene[1]]
    assert scorer.score(image, moved)["position_acc"] == 0.5

    r = scorer.score(world.render(scene[:1], 32), scene)
    assert r["objects_found"] == 1 and not r["count_correct"] and not r["all_correct"] and r["main_correct"]

    r = scorer.score(image, scene[:1])
    assert not r["count_correct"] and not r["all_correct"] and r["main_correct"]

    blank = world.render([], 32)
    r = scorer.score(blank, scene)
    assert r["objects_found"] == 0 and r["color_acc"] == 0.0 and not r["main_correct"]


def test_matching_ignores_order_and_unnamed_attributes():
    scene = [
        {"shape": "triangle", "color": "yellow", "size": "large", "position": "right"},
        {"shape": "cross", "color": "magenta", "size": "small", "position": "bottom left"},
        {"shape": "ring", "color": "white", "size": "small", "position": "top"},
    ]
    image = world.render(scene, 64)
    # A text prompt names colours and shapes, maybe not sizes or positions, in any order.
    asked = [{"shape": o["shape"], "color": o["color"]} for o in reversed(scene)]
    r = scorer.score(image, asked)
    assert r["all_correct"] and "size_acc" not in r and "position_acc" not in r
    assert r["shape_acc"] == r["color_acc"] == 1.0


def test_score_batch_and_bad_input():
    examples = [world.example(i, "test") for i in range(8)]
    means = scorer.score_batch(np.stack([ex["image"] for ex in examples]), [ex["objects"] for ex in examples])
    assert means["all_correct"] == 1.0 and means["objects_expected"] > 1
    with pytest.raises(ValueError, match="RGB"):
        scorer.read_objects(np.zeros((32, 32), np.uint8))
