"""from_hf / to_hf on tiny random Hugging Face LlamaForCausalLM models (GQA, two rope thetas, tied and
untied embeddings): logits match in float32, greedy decoding with our KV cache matches HF's
generate token for token, and an exported directory loads back in transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import models
from vlm_jax.convert import from_hf, to_hf
from vlm_jax.models import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 97
CASES = [(10000.0, False), (500000.0, True)]  # (rope theta, tied embeddings)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"theta{int(c[0])}-{'tied' if c[1] else 'untied'}")
def hf_llama(request, tmp_path_factory):
    theta, tied = request.param
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=theta,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1: make every weight count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf_llama")
    # Untied: several shards + index; tied: one model.safetensors.
    model.save_pretrained(path, safe_serialization=True, max_shard_size="50GB" if tied else "20KB")
    return path, model, theta, tied


def _tokens(batch=2, length=11, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, (batch, length)).astype(np.int64)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def test_logits_match_transformers(hf_llama):
    path, hf_model, theta, tied = hf_llama
    config, params = from_hf(str(path))
    assert config.model.rope_theta == theta and config.model.tie_embeddings == tied
    assert config.model.kv_heads == 2 and ("lm_head" in params) == (not tied)
    tokens = _tokens()
    ours = models.build(config).apply({"params": params}, jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(ours, _hf_logits(hf_model, tokens), atol=1e-4, rtol=1e-4)


def test_scanned_import_matches(hf_llama):
    path, hf_model, _, _ = hf_llama
    config, params = from_hf(str(path), scan_layers=True)
    tokens = _tokens(1, 7, seed=1)
    ours = models.build(config).apply({"params": params}, jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(ours, _hf_logits(hf_model, tokens), atol=1e-4, rtol=1e-4)


def _greedy(model, params, prompt, steps):
    """Prefill the prompt, then one token per step through the KV cache: [B, steps] new tokens."""
    apply = jax.jit(
        lambda cache, tok: model.apply({"params": params, "cache": cache}, tok, decode=True, mutable=["cache"])
    )
    logits, state = apply(llama.init_cache(model, prompt.shape[0]), jnp.asarray(prompt, jnp.int32))
    out = []
    for _ in range(steps):
        nxt = jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
        out.append(nxt)
        logits, state = apply(state["cache"], nxt)
    return np.asarray(jnp.concatenate(out, axis=1))


def test_greedy_generation_matches_transformers(hf_llama):
    path, hf_model, _, _ = hf_llama
    config, params = from_hf(str(path))
    prompt = _tokens(2, 6, seed=2)
    ours = _greedy(models.build(config), params, prompt, 20)
    with torch.no_grad():
        theirs = hf_model.generate(
            torch.from_numpy(prompt),
            attention_mask=torch.ones_like(torch.from_numpy(prompt)),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
        )[:, prompt.shape[1] :].numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_to_hf_round_trip(hf_llama, tmp_path):
    path, hf_model, _, tied = hf_llama
    config, params = from_hf(str(path), scan_layers=True)  # export unstacks scanned layers
    to_hf(config, params, str(tmp_path))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.tie_word_embeddings == tied
    tokens = _tokens(2, 9, seed=3)
    np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(hf_model, tokens), atol=1e-5)
    config2, params2 = from_hf(str(tmp_path))
    assert config2.model.to_dict() == {**config.model.to_dict(), "scan_layers": False}
    jax.tree.map(np.testing.assert_array_equal, params2, jax.device_get(from_hf(str(path))[1]))
