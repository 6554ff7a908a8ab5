"""Config files, variants and dotted overrides."""

import pytest

from vlm_jax import config as config_lib


def test_load_variant_and_override():
    config = config_lib.load("configs/clip.py:tiny", ["optim.lr=3e-4", "train.steps=7"])
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.model.name == "clip" and config.task.name == "contrastive"


def test_unknown_key_names_the_nearest():
    with pytest.raises(config_lib.ConfigError, match="optim.lr"):
        config_lib.load("configs/clip.py:tiny", ["optim.lrr=1"])
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'trian.steps'"):
        config_lib.load("configs/clip.py:tiny", ["trian.steps=1"])


def test_bad_values_and_specs():
    with pytest.raises(config_lib.ConfigError):
        config_lib.load("configs/clip.py:tiny", ["train.progress=maybe"])
    with pytest.raises(config_lib.ConfigError, match="not found"):
        config_lib.load("configs/nope.py:tiny")
    with pytest.raises(ValueError, match="unknown clip variant"):
        config_lib.load("configs/clip.py:huge")


def test_sequence_values_from_the_command_line():
    """A tuple key takes "a", "a,b", "(1, 2)" or "[1, 2]"; a value of the wrong type is a ConfigError."""
    config = config_lib.load("configs/gan_int_cls.py:tiny", ["stages.order=gan", "model.text.depth=1"])
    assert config.stages.order == ("gan",)
    assert config_lib.load("configs/gan_int_cls.py:tiny", ["stages.order=clip, gan"]).stages.order == ("clip", "gan")
    config = config_lib.load("configs/clip.py:tiny", ["model.image.channels=(8, 16)"])
    assert config.model.image.channels == (8, 16)
    assert config_lib.load("configs/clip.py:tiny", ["model.image.channels=[8,16]"]).model.image.channels == (8, 16)
    with pytest.raises(config_lib.ConfigError, match="model.image=1"):
        config_lib.load("configs/clip.py:tiny", {"model.image": 1})


def test_locked_config_rejects_new_attributes():
    config = config_lib.load("configs/clip.py:tiny")
    with pytest.raises(AttributeError):
        config.optim.learning_rate = 1.0


def test_cli_override_forms():
    rest, overrides = config_lib.split_overrides(
        ["train", "--config", "c.py:tiny", "--config.optim.lr=1e-3", "--config.train.steps", "5"]
    )
    assert rest == ["train", "--config", "c.py:tiny"]
    assert overrides == ["optim.lr=1e-3", "train.steps=5"]


@pytest.mark.parametrize("variant", ["tiny", "rn50", "b32", "b16", "l14"])
def test_all_clip_variants_load(variant):
    config = config_lib.load(f"configs/clip.py:{variant}")
    assert config.model.embed_dim > 0


def test_json_roundtrip():
    config = config_lib.load("configs/clip.py:tiny")
    again = config_lib.from_json(config_lib.to_json(config))
    assert again.model.text.width == config.model.text.width
    assert again.optim.lr == config.optim.lr
