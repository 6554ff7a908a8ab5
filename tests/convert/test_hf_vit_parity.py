"""from_hf on tiny random Hugging Face ViTModel / ViTForImageClassification: hidden states match."""

import jax
import numpy as np
import pytest

from vlm_jax import models
from vlm_jax.convert import ConversionError, from_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _config(**kw):
    return transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=16,
        patch_size=4,
        hidden_act="gelu",
        **kw,
    )


def _perturb(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    torch.manual_seed(0)
    model = _perturb(transformers.ViTModel(_config()))
    path = tmp_path_factory.mktemp("hf_vit")
    model.save_pretrained(path)
    return path, model


def _pixels():
    return np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)


def test_hidden_states_and_pooler_match(hf_vit):
    path, hf = hf_vit
    config, params = from_hf(str(path))
    assert config.task.name == "classification" and config.model.representation_size == 32
    model = models.build(config)
    pixels = _pixels()
    with torch.no_grad():
        want = hf(pixel_values=torch.from_numpy(pixels))
    run = jax.jit(lambda v, x: (model.apply(v, x, method="encode"), model.apply(v, x)))
    enc, pooled = run({"params": params}, pixels.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(enc["hidden"], want.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(pooled, want.pooler_output.numpy(), atol=1e-4, rtol=1e-4)


def test_classifier_and_module_style_names(hf_vit, tmp_path):
    """ViTForImageClassification, written with transformers 5's in-memory names (layers.i.*)."""
    torch.manual_seed(2)
    hf = _perturb(transformers.ViTForImageClassification(_config(num_labels=5)))
    hf.save_pretrained(tmp_path)
    safetensors_torch.save_file(  # replace the saved (legacy-named) weights by the module names
        {k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors")
    )
    assert any(k.startswith("vit.layers.0.attention.q_proj") for k in hf.state_dict())
    config, params = from_hf(str(tmp_path))
    assert config.model.num_classes == 5 and config.model.representation_size == 0
    pixels = _pixels()
    with torch.no_grad():
        want = hf(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    got = jax.jit(models.build(config).apply)({"params": params}, pixels.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_missing_and_extra_weights_are_errors(hf_vit, tmp_path):
    tensors = safetensors_torch.load_file(str(hf_vit[0] / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_vit[0] / "config.json").read_text())
    missing = {k: v for k, v in tensors.items() if "layer.1.output.dense.bias" not in k}
    safetensors_torch.save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ConversionError, match=r"no weight 'encoder\.layer\.1\.output\.dense\.bias'"
    ):
        from_hf(str(tmp_path))
    extra = {**tensors, "decoder.weight": tensors["layernorm.weight"].clone()}
    safetensors_torch.save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConversionError, match="decoder.weight"):
        from_hf(str(tmp_path))
