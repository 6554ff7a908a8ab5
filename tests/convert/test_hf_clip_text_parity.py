"""convert.hf_clip_text on a tiny random transformers CLIPTextModel: our TextTransformer's hidden
states are its last_hidden_state (and pooled its pooler_output) in float32, padded rows included."""

import contextlib
import json

import jax
import numpy as np
import pytest

from vlm_jax import models
from vlm_jax.convert import hf_clip_text
from vlm_jax.convert.checks import ConversionError, Tensors, finish_params
from vlm_jax.convert.safetensors_io import read_safetensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, PAD, LENGTH = 99, 1, 12
EOS = VOCAB - 1  # the last id, as in CLIP's vocabulary


def _save(path, hidden_act, eos_token_id, cls=None):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=LENGTH, hidden_act=hidden_act, eos_token_id=eos_token_id, pad_token_id=PAD,
        bos_token_id=0, projection_dim=16,
    )
    model = (cls or transformers.CLIPTextModel)(config).eval()
    with torch.no_grad():  # biases start at 0 and norms at 1: make every weight count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def _convert(path, raw=None):
    hf = json.loads((path / "config.json").read_text())
    raw = read_safetensors(str(path)) if raw is None else raw
    cfg = hf_clip_text.model_config(hf, {k: v.shape for k, v in raw.items()})
    tensors = Tensors(raw, ignore=hf_clip_text.IGNORED)
    params = hf_clip_text.params(tensors, cfg)
    tensors.finish()
    params = finish_params(cfg, params, hf_clip_text.dummy_inputs(cfg), dtype="float32", scan_layers=False)
    return cfg, params


def _tokens():
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, EOS - 1, size=(4, LENGTH))
    tokens[:, 0] = 0  # bos
    tokens[0, 4], tokens[0, 5:] = EOS, PAD  # padded with the pad id
    tokens[1, 6:] = EOS  # padded with eos, as SD1's tokenizer does
    tokens[2, LENGTH - 1] = EOS  # a full row
    tokens[3, 3], tokens[3, 4:] = EOS, 0  # padded with id 0, as SD2's tokenizer does
    mask = np.ones_like(tokens)
    mask[0, 5:] = mask[1, 7:] = mask[3, 4:] = 0
    return tokens, mask


@pytest.mark.parametrize(
    "hidden_act, eos_token_id", [("quick_gelu", EOS), ("gelu", 2)]  # 2: the legacy id SD's configs carry
)
def test_hidden_states_match_transformers(tmp_path, hidden_act, eos_token_id):
    hf = _save(tmp_path, hidden_act, eos_token_id)
    with pytest.warns(UserWarning, match="legacy") if eos_token_id == 2 else contextlib.nullcontext():
        cfg, params = _convert(tmp_path)
    assert cfg.name == "text" and cfg.eos_id == EOS and cfg.context_length == LENGTH and cfg.depth == 2
    model = models.build(cfg)

    tokens, mask = _tokens()
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(tokens))
        masked = hf(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask))
    out = jax.jit(model.apply)({"params": params}, tokens.astype(np.int32))
    np.testing.assert_allclose(out["hidden"], want.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["pooled"], want.pooler_output.numpy(), atol=1e-4, rtol=0)
    # With an attention mask, transformers agrees at the real tokens (causal: pads come after them).
    real = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(out["hidden"])[real], masked.last_hidden_state.numpy()[real], atol=1e-4, rtol=0
    )


def test_hub_names_with_the_text_model_prefix(tmp_path):
    # transformers 5 saves CLIPTextModel without the `text_model.` wrapper; hub folders have it.
    _save(tmp_path, "quick_gelu", EOS)
    raw = read_safetensors(str(tmp_path))
    assert "embeddings.token_embedding.weight" in raw or "text_model.embeddings.token_embedding.weight" in raw
    bare = {k.removeprefix("text_model."): v for k, v in raw.items()}
    hub = {f"text_model.{k}": v for k, v in bare.items()}
    hub["text_model.embeddings.position_ids"] = np.arange(LENGTH)[None]  # old exports' buffer, ignored
    _, want = _convert(tmp_path, bare)
    _, got = _convert(tmp_path, hub)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_with_projection_is_refused(tmp_path):
    _save(tmp_path, "quick_gelu", EOS, cls=transformers.CLIPTextModelWithProjection)
    hf = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ConversionError, match="CLIPTextModelWithProjection"):
        hf_clip_text.model_config(hf)
    hf.pop("architectures")
    shapes = {k: v.shape for k, v in read_safetensors(str(tmp_path)).items()}
    with pytest.raises(ConversionError, match="text_projection"):
        hf_clip_text.model_config(hf, shapes)


def test_unknown_activation_is_refused():
    with pytest.raises(ConversionError, match="hidden_act"):
        hf_clip_text.model_config(dict(model_type="clip_text_model", hidden_act="swish"))
