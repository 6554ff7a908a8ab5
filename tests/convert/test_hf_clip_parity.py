"""from_hf on a tiny random Hugging Face CLIPModel (saved sharded): embeddings match in float32."""

import json
import shutil

import jax
import numpy as np
import pytest

from vlm_jax import models
from vlm_jax.convert import ConversionError, from_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EOS, PAD = 98, 1


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=12,
            hidden_act="quick_gelu",
            eos_token_id=EOS,
            pad_token_id=PAD,
            bos_token_id=97,
        ),
        vision_config=dict(
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            hidden_act="quick_gelu",
        ),
        projection_dim=20,
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # HF zero-initialises biases and sets norms to 1: make every weight count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf_clip")
    model.save_pretrained(path, max_shard_size="40KB")  # several shards + index
    return path, model


def _features(out):
    # transformers 5 returns a ModelOutput with the projected features as pooler_output.
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()


def test_embeddings_match_transformers(hf_clip):
    path, hf = hf_clip
    assert (path / "model.safetensors.index.json").exists()
    config, params = from_hf(str(path))
    assert config.task.name == "contrastive" and config.model.text.eos_id == EOS
    assert config.data.image_size == 16 and config.data.text_length == 12
    model = models.build(config)

    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 3, 16, 16)).astype(np.float32)
    tokens = rng.integers(2, 97, size=(3, 12))
    tokens[0, 5:] = PAD
    tokens[0, 4] = EOS
    tokens[1, 11] = EOS  # eos in the last position
    tokens[2, 2] = tokens[2, 7] = EOS  # features come from the first eos
    with torch.no_grad():
        want_img = _features(hf.get_image_features(pixel_values=torch.from_numpy(pixels)))
        want_txt = _features(hf.get_text_features(input_ids=torch.from_numpy(tokens)))
        hf_out = hf(input_ids=torch.from_numpy(tokens), pixel_values=torch.from_numpy(pixels))

    variables = {"params": params}
    images = pixels.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    run = jax.jit(
        lambda v, x, t: (
            model.apply(v, x, method="encode_image"),
            model.apply(v, t, method="encode_text"),
            model.apply(v, x, t),
        )
    )
    img, txt, out = run(variables, images, tokens.astype(np.int32))
    np.testing.assert_allclose(img, want_img, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(txt, want_txt, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["image_embeds"], hf_out.image_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(out["text_embeds"], hf_out.text_embeds.numpy(), atol=1e-4)
    assert float(out["logit_scale"]) == pytest.approx(
        float(hf.logit_scale.detach().exp()), rel=1e-5
    )


def test_scanned_import_stacks_layers(hf_clip):
    config, params = from_hf(str(hf_clip[0]), scan_layers=True)
    assert config.model.scan_layers
    assert params["text"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"].shape == (2, 32, 48)


def test_shape_mismatch_is_a_clear_error(hf_clip, tmp_path):
    path = tmp_path / "bad"
    shutil.copytree(hf_clip[0], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_config"]["intermediate_size"] = 44  # the weights say 40
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConversionError, match=r"image/encoder/layers_0/mlp/fc1/kernel.*\(24, 44\).*\(24, 40\)"
    ):
        from_hf(str(path))


def test_missing_shard_and_pickle_only_dirs(hf_clip, tmp_path):
    path = tmp_path / "partial"
    shutil.copytree(hf_clip[0], path)
    next(path.glob("model-0000*-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shards"):
        from_hf(str(path))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(hf_clip[0] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickled"):
        from_hf(str(pickled))


def test_convert_command_writes_config_and_params(hf_clip, tmp_path):
    import orbax.checkpoint as ocp

    from vlm_jax import config as config_lib
    from vlm_jax.cli import main

    path, _ = hf_clip
    out = tmp_path / "converted"
    assert main(["convert", "--from-hf", str(path), "--out", str(out)]) == 0
    config = config_lib.from_json((out / "config.json").read_text())
    assert config.model.embed_dim == 20 and config.model.text.eos_id == EOS
    restored = ocp.StandardCheckpointer().restore(str(out / "params"))
    _, params = from_hf(path)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
