"""evals.grounding (attention mass inside the named object's box) and the image-attention maps of
sampling.attention that it scores, plus the caption evaluator's grounding=True path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax.evals import grounding


def test_words_of_pieces():
    pieces = ["\u2581a", "\u2581mag", "enta", "\u2581circle", ",", "\u2581a", "\u2581red", "\u2581ring", "."]
    assert grounding.words_of(pieces) == [
        ("a", [0]), ("magenta", [1, 2]), ("circle", [3, 4]), ("a", [5]), ("red", [6]), ("ring", [7, 8]),
    ]
    assert grounding.words_of(["", "\u2581", "."]) == []


def test_mass_in_box_cells_and_partial_overlap():
    uniform = np.full((4, 4), 1 / 16)
    box = (3, 5, 19, 13)  # 16 x 8 pixels of 32 x 32
    assert grounding.mass_in_box(uniform, box, 32) == pytest.approx(grounding.box_area(box, 32))
    assert grounding.box_area(box, 32) == pytest.approx(16 * 8 / 1024)
    one = np.zeros((4, 4))
    one[1, 1] = 1.0  # the cell of pixels x 8..16, y 8..16: inside x 3..19, y 5..13 for y 8..13
    assert grounding.mass_in_box(one, box, 32) == pytest.approx(5 / 8)
    assert grounding.mass_in_box(one, (0, 0, 8, 8), 32) == 0.0
    assert grounding.mass_in_box(one, (0, 0, 32, 32), 32) == pytest.approx(1.0)


def _objects():
    return [
        {"color": "red", "shape": "circle", "box": (0, 0, 16, 16)},
        {"color": "blue", "shape": "ring", "box": (16, 16, 24, 24)},
        {"color": "green", "shape": "cross", "box": (0, 16, 8, 24)},
        {"color": "green", "shape": "cross", "box": (24, 0, 32, 8)},
    ]


def test_score_names_boxes_and_counts_wrong_and_ambiguous_mentions():
    pieces = ["\u2581a", "\u2581red", "\u2581circle", ",", "\u2581a", "\u2581blue", "\u2581ring", "\u2581a",
              "\u2581green", "\u2581cross", "\u2581and", "\u2581a", "\u2581white", "\u2581square", "."]
    maps = np.zeros((len(pieces), 4, 4))
    maps[:, 3, 3] = 1.0  # default: the bottom-right corner cell, inside no scored box
    maps[1, 0, 0] = 1.0  # "red": all of it on the red circle's cells, half on 0,0 half on 1,1
    maps[1, 3, 3] = 0.0
    maps[2, 0, 0] = 0.5
    maps[2, 1, 1] = 0.5
    maps[2, 3, 3] = 0.0
    maps[5, 2, 2] = 1.0  # "blue" on the blue ring's cell
    maps[5, 3, 3] = 0.0
    words, mentions = grounding.score(maps, pieces, _objects(), 32)
    assert [(w.text, w.kind) for w in words] == [("red", "colour"), ("circle", "shape"), ("blue", "colour"),
                                                 ("ring", "shape")]
    # "circle" is pieces 2 and 3 (",") averaged: 1.0 and 0.0 (the "," map is the corner).
    assert [w.mass for w in words] == pytest.approx([1.0, 0.5, 1.0, 0.0])
    assert [w.area for w in words] == pytest.approx([0.25, 0.25, 1 / 16, 1 / 16])
    assert (mentions.total, mentions.wrong, mentions.ambiguous) == (4, 1, 1)
    out = grounding.summarise(words, mentions)
    assert out["words"] == 4 and out["wrong_mentions"] == 0.25 and out["ambiguous_mentions"] == 0.25
    assert out["mass_in_box"] == pytest.approx(2.5 / 4)
    assert out["colour/mass_in_box"] == pytest.approx(1.0) and out["shape/mass_in_box"] == pytest.approx(0.25)
    assert out["ratio"] == pytest.approx((2.5 / 4) / ((0.25 + 1 / 16) / 2))


@pytest.fixture(scope="module")
def sat(world_cache):
    from vlm_jax import config as config_lib
    from vlm_jax import models

    config = config_lib.load(
        "configs/show_attend_tell.py:tiny",
        {
            "data.tfds_data_dir": str(world_cache / "tfds"),
            "tokenizer.path": str(world_cache / "tokenizer.model"),
            "model.embed_dim": 16, "model.hidden": 16, "model.attn_dim": 16,
            # A SmallCNN whose third stage, before its pool, is the 8x8 annotation grid.
            "model.encoder.channels": (8, 8, 16, 16), "model.encoder.output_dim": 16,
        },
    )
    with config.unlocked():
        config.data.world_num_examples.update(dict(train=64, validation=32, test=32))
    model = models.build(config)
    images, tokens = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(jax.jit(lambda r: model.init({"params": r}, images, tokens))(jax.random.key(0)))["params"]
    return config, model, params


def test_attention_maps_of_sat_and_coca_are_distributions_over_the_grid(sat):
    from vlm_jax import config as config_lib
    from vlm_jax import models
    from vlm_jax.sampling import attention

    _, model, params = sat
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    tokens = jnp.array([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]])
    def maps_of(model, params):  # jitted: eager flax applies are slow op by op
        return attention.as_grid(jax.jit(lambda p: attention.flat_attention(model, p, images, tokens))(params))

    maps = maps_of(model, params)
    assert maps.shape == (2, 5, 8, 8)
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, atol=1e-5)

    coca_cfg = config_lib.load("configs/coca.py:tiny", {
        "model.image.width": 32, "model.image.depth": 1, "model.text.width": 32, "model.embed_dim": 32,
        "model.text.unimodal_depth": 1, "model.caption_queries": 4,
    })
    coca = models.build(coca_cfg)
    variables = jax.jit(coca.init)(jax.random.key(0), images, tokens)
    coca_params = nn.unbox(variables)["params"]
    maps = maps_of(coca, coca_params)
    assert maps.shape == (2, 5, 4, 4)  # 32 / patch 8
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, atol=1e-5)
    # Each query's map differs with the tokens it follows (not one map for the caption).
    assert np.abs(maps[0, 1] - maps[0, 3]).max() > 1e-6
    # Scanned layers (q/k captured with a leading layers axis) give the same maps.
    from vlm_jax.layers.transformer import stack_layers

    with coca_cfg.unlocked():
        coca_cfg.model.scan_layers = True
    scanned = models.build(coca_cfg)
    np.testing.assert_allclose(maps_of(scanned, stack_layers(coca_params)), maps, atol=1e-6)
    with pytest.raises(ValueError, match="no attention over the image"):
        attention.image_attention(object(), None, images, tokens)


def test_caption_evaluator_reports_grounding(sat, world_cache):
    from vlm_jax import evals
    from vlm_jax.data.tokenizer import Tokenizer

    config, model, params = sat
    tokenizer = Tokenizer.load(world_cache / "tokenizer.model")
    cfg = ml_collections.ConfigDict(
        dict(kinds=("caption",), split="validation", num_examples=32, method="greedy", max_new_tokens=12,
             batch_size=32, grounding=True)
    )
    with config.unlocked():
        config.evals = ml_collections.ConfigDict(dict(val=cfg))
    (ev,) = evals.build(config, model, tokenizer, mesh=None)
    assert len(ev.data["objects"]) == 32 and "box" in ev.data["objects"][0][0]
    out = ev(params, {})
    assert len(ev.last_ids) == 32
    # A random model names some objects (or none); whatever it scores lies in [0, 1].
    assert out["val/grounding/words"] >= 0
    for key in ("mass_in_box", "box_area"):
        if f"val/grounding/{key}" in out:
            assert 0.0 <= out[f"val/grounding/{key}"] <= 1.0
    # Captions that name each image's main object: its colour and shape words are scored against its
    # box (when no other object has the same colour and shape).
    ids, areas, ambiguous = [], [], 0
    for objects in ev.data["objects"]:
        main = objects[0]
        ids.append(tokenizer.encode(f"a {main['color']} {main['shape']}.") + [tokenizer.eos_id])
        if sum((o["color"], o["shape"]) == (main["color"], main["shape"]) for o in objects) == 1:
            areas.append(grounding.box_area(main["box"], 32))
        else:
            ambiguous += 1
    got = ev.ground(params, {}, ids)
    assert got["words"] == 2 * len(areas) and len(areas) > 16
    assert got["box_area"] == pytest.approx(np.mean(areas))
    assert got["ambiguous_mentions"] == ambiguous / 32 and got["wrong_mentions"] == 0.0
    assert 0.0 < got["mass_in_box"] < 1.0


def test_grounding_needs_attention_and_boxes(sat, world_cache):
    from vlm_jax import config as config_lib
    from vlm_jax import evals, models
    from vlm_jax.data.tokenizer import Tokenizer

    config = config_lib.load(
        "configs/show_tell.py:tiny",
        {"data.tfds_data_dir": str(world_cache / "tfds"), "tokenizer.path": str(world_cache / "tokenizer.model")},
    )
    with config.unlocked():
        config.data.world_num_examples.update(dict(train=64, validation=32, test=32))
        config.evals = ml_collections.ConfigDict(dict(val=dict(
            kinds=("caption",), split="validation", num_examples=8, grounding=True)))
    tokenizer = Tokenizer.load(world_cache / "tokenizer.model")
    with pytest.raises(ValueError, match="grounding needs a model with attention"):
        evals.build(config, models.build(config), tokenizer, mesh=None)
