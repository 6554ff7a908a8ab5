"""Preview: a PNG grid with one cell per sample, captions under the images."""

import numpy as np
from PIL import Image

from vlm_jax.config_defaults import base_config
from vlm_jax.data import preview, world
from vlm_jax.data.tokenizer import Tokenizer


def test_preview_grid(tmp_path):
    config = base_config()
    records = [world.example(i, "train") for i in range(4)]
    records.append({"image": b"broken", "captions": ["a broken image"], "label": 0})
    records.append({"image": np.zeros((20, 30), np.uint16), "captions": []})
    out = preview.write_preview(config, tmp_path / "sub" / "grid.png", num=6, source=records)
    with Image.open(out) as img:
        assert img.format == "PNG"
        cols, rows = 3, 2  # ceil(sqrt(6)) columns
        assert img.width == cols * preview.CELL and img.height > rows * preview.CELL
        pixels = np.asarray(img.convert("RGB"))
    # The first cell shows the upscaled world image, not a blank.
    assert pixels[: preview.CELL, : preview.CELL].std() > 0
    # Text is drawn under the cell.
    assert (pixels[preview.CELL + 2 : img.height // rows, : preview.CELL] < 100).any()


def test_preview_with_tokenizer_shows_what_the_model_reads(tmp_path):
    config = base_config()
    config.data.text_length = 6
    tok = Tokenizer.train(world.text_corpus(num=200), str(tmp_path / "spm"), 256)
    records = [world.example(i, "train") for i in range(3)]
    assert preview._describe(records[0], tok, 6)[-1].startswith(
        tok.decode(tok.tokenize([records[0]["captions"][0]], 6)[0])
    )
    out = preview.write_preview(config, tmp_path / "grid.png", num=16, source=records, tokenizer=tok)
    with Image.open(out) as img:
        assert img.width == 2 * preview.CELL  # num is capped at the 3 records there are


def test_preview_from_a_coco_config(tmp_path):
    import json

    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "red.jpg")
    (tmp_path / "caps.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "red.jpg"}, {"id": 2, "file_name": "gone.jpg"}],
        "annotations": [{"image_id": 1, "caption": "a red photo"}, {"image_id": 2, "caption": "x"}],
    }))
    config = base_config()
    config.data.source, config.data.path = "coco", str(tmp_path / "caps.json")
    out = preview.write_preview(config, tmp_path / "p.png", split="validation")
    with Image.open(out) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert img.width == 2 * preview.CELL
    assert pixels[10, 10].tolist() == [254, 0, 0] or pixels[10, 10, 0] > 240  # the red image
    assert pixels[10, preview.CELL + 10].tolist() == [128, 128, 128]  # the missing one, grey
