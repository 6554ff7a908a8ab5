"""Decoding loops: cache vs full forward, padded batches, sampling filters, beam search, stops,
streaming, and sampling text from a checkpointed run."""

import io
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models import llama
from vlm_jax.sampling import decode
from vlm_jax.train.state import init_state

V, MAX_LEN = 61, 32
PROMPTS = [[2, 5, 7, 9, 11, 13, 17, 19, 23, 29], [2, 31], [2, 40, 41, 42]]


def _small(**kw):
    args = dict(vocab_size=V, width=32, depth=2, heads=4, kv_heads=2, mlp_dim=48, max_len=MAX_LEN)
    args.update(kw)
    return llama.Llama(**args)


@pytest.fixture(scope="module")
def lm():
    model = _small()
    # JAX's default random bits (tests/conftest.py turns them off): test_beam_search needs a model
    # whose greedy path beam search beats for some prompt, and these weights are one.
    with jax.threefry_partitionable(True):
        params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    # Sharper next-token distributions than the init's (nearly uniform) ones, so greedy and
    # beam search differ and sampling has something to filter.
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 8.0
    full = jax.jit(lambda tokens: jax.nn.log_softmax(model.apply({"params": params}, tokens), axis=-1))
    return decode.LlamaDecoder(model), params, full


def _full_logp(full, seqs):
    """log-probs [N, MAX_LEN, V] of sequences right-padded to MAX_LEN (causal: padding is harmless),
    run as a batch of 64 rows (one compile)."""
    rows = np.zeros((64, MAX_LEN), np.int32)
    for r, s in enumerate(seqs):
        rows[r, : len(s)] = s
    return np.asarray(full(rows))[: len(seqs)]


_prefill = jax.jit(decode._prefill, static_argnums=0)


def _seq_logprob(full, prompt, new):
    logp = _full_logp(full, [prompt + new])[0]
    return sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(new))


def _greedy_reference(full, prompts, steps):
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        logp = _full_logp(full, seqs)
        for r, s in enumerate(seqs):
            s.append(int(np.argmax(logp[r, len(s) - 1])))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def test_greedy_matches_full_forward(lm):
    decoder, params, full = lm
    out = decode.generate_detailed(decoder, params, PROMPTS, max_new_tokens=6, stop_tokens=())
    assert out.tokens == _greedy_reference(full, PROMPTS, 6)
    assert out.stopped == [False] * 3
    for p, new, lp in zip(PROMPTS, out.tokens, out.logprobs):
        np.testing.assert_allclose(lp, _seq_logprob(full, p, new), rtol=1e-5, atol=1e-4)


def test_padded_batch_matches_each_prompt_alone(lm):
    decoder, params, _ = lm
    batch = decode._left_pad(PROMPTS, 4, MAX_LEN, 0)
    logits, _ = _prefill(decoder, params, *batch[:3], None)
    together = decode.generate_detailed(decoder, params, PROMPTS, max_new_tokens=6, stop_tokens=())
    for r, p in enumerate(PROMPTS):
        alone_logits, _ = _prefill(decoder, params, *decode._left_pad([p], 4, MAX_LEN, 0)[:3], None)
        np.testing.assert_allclose(logits[r], alone_logits[0], atol=1e-5, rtol=0)
        alone = decode.generate_detailed(decoder, params, [p], max_new_tokens=6, stop_tokens=())
        assert alone.tokens[0] == together.tokens[r]
        np.testing.assert_allclose(alone.logprobs[0], together.logprobs[r], atol=1e-5)


def test_padding_is_never_attended(lm):
    decoder, params, _ = lm
    # Same prompts, different garbage in the padding slots: identical logits.
    tokens, positions, valid, _ = decode._left_pad(PROMPTS, 4, MAX_LEN, 0)
    noisy = np.where(valid, tokens, np.arange(tokens.size).reshape(tokens.shape) % V)
    a, _ = _prefill(decoder, params, tokens, positions, valid, None)
    b, _ = _prefill(decoder, params, noisy, positions, valid, None)
    np.testing.assert_array_equal(a, b)


def test_sampling_filters(lm):
    decoder, params, full = lm
    greedy = decode.generate(decoder, params, PROMPTS, max_new_tokens=6, stop_tokens=())
    kw = dict(max_new_tokens=6, method="sample", stop_tokens=(), rng=3)
    assert decode.generate(decoder, params, PROMPTS, top_k=1, temperature=2.0, **kw) == greedy
    assert decode.generate(decoder, params, PROMPTS, top_p=1e-6, temperature=2.0, **kw) == greedy
    assert decode.generate(decoder, params, PROMPTS, temperature=0.0, **kw) == greedy
    sampled = decode.generate(decoder, params, PROMPTS, top_k=3, temperature=3.0, **kw)
    assert sampled == decode.generate(decoder, params, PROMPTS, top_k=3, temperature=3.0, **kw)
    assert sampled != greedy
    for p, new in zip(PROMPTS, sampled):
        logp = _full_logp(full, [p + new])[0]
        for j, t in enumerate(new):
            assert t in np.argsort(-logp[len(p) - 1 + j])[:3]
    x = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(decode.filter_logits(x, top_p=0.7))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])


def test_beam_search(lm):
    decoder, params, full = lm
    kw = dict(max_new_tokens=6, stop_tokens=(), length_penalty=0.0)
    greedy = decode.generate_detailed(decoder, params, PROMPTS, **kw)
    one = decode.generate_detailed(decoder, params, PROMPTS, method="beam", beam_size=1, **kw)
    assert one.tokens == greedy.tokens
    four = decode.generate_detailed(decoder, params, PROMPTS, method="beam", beam_size=4, **kw)
    for r, p in enumerate(PROMPTS):
        beams = four.beams[r]
        assert len(beams) == 4 and beams[0].tokens == four.tokens[r]
        assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)
        for b in beams:
            np.testing.assert_allclose(b.logprob, _seq_logprob(full, p, b.tokens), atol=1e-4)
        assert _seq_logprob(full, p, four.tokens[r]) >= _seq_logprob(full, p, greedy.tokens[r]) - 1e-5
    assert four.tokens != greedy.tokens  # the search found something better somewhere


def test_beam_search_is_exact_when_the_beam_holds_every_prefix(lm):
    decoder, params, full = lm
    prompt = PROMPTS[2]
    out = decode.generate_detailed(
        decoder, params, [prompt], max_new_tokens=2, method="beam", beam_size=V, stop_tokens=(), length_penalty=0.0
    )
    first = _full_logp(full, [prompt])[0, len(prompt) - 1]
    second = _full_logp(full, [prompt + [t] for t in range(V)])[:, len(prompt)]
    total = first[:, None] + second
    best = np.unravel_index(np.argmax(total), total.shape)
    assert out.tokens[0] == [int(best[0]), int(best[1])]
    np.testing.assert_allclose(out.logprobs[0], total.max(), atol=1e-4)


def test_beam_search_keeps_finished_hypotheses(lm):
    decoder, params, full = lm
    alpha = 0.6
    greedy = decode.generate(decoder, params, PROMPTS, max_new_tokens=6, stop_tokens=())
    stop = greedy[0][2]
    out = decode.generate_detailed(
        decoder, params, PROMPTS, max_new_tokens=6, method="beam", beam_size=4, stop_tokens=(stop,),
        length_penalty=alpha,
    )
    assert any(b.stopped for rb in out.beams for b in rb)
    for p, beams in zip(PROMPTS, out.beams):
        for b in beams:
            assert stop not in b.tokens
            new = b.tokens + ([stop] if b.stopped else [])
            np.testing.assert_allclose(b.logprob, _seq_logprob(full, p, new), atol=1e-4)
            np.testing.assert_allclose(b.score, b.logprob / ((5 + len(new)) / 6) ** alpha, rtol=1e-5)


def test_stop_tokens(lm):
    decoder, params, _ = lm
    greedy = decode.generate(decoder, params, PROMPTS, max_new_tokens=6, stop_tokens=())
    stop = greedy[0][2]
    unused = min(set(range(V)) - {t for g in greedy for t in g})
    out = decode.generate_detailed(decoder, params, PROMPTS, max_new_tokens=6, stop_tokens=(stop, unused), pad_id=59)
    for r, g in enumerate(greedy):
        cut = g.index(stop) if stop in g else len(g)
        assert out.tokens[r] == g[:cut]
        assert out.stopped[r] == (stop in g)
    # The raw buffer: the stop token, then pad; padded rows keep pad.
    tokens, positions, valid, lengths = decode._left_pad(PROMPTS, 6, MAX_LEN, 59)
    buf, n, stopped, _ = decode._sampling_loop(
        decoder, params, tokens, positions, valid, lengths, None, jax.random.key(0), 1.0, 1.0,
        decode._stop_array([stop]), 59, max_new_tokens=6, sample=False, top_k=0, use_top_p=False,
    )
    assert buf[0].tolist()[: greedy[0].index(stop) + 1] == greedy[0][: greedy[0].index(stop) + 1]
    assert set(buf[0, greedy[0].index(stop) + 1 :].tolist()) == {59} and bool(stopped[0])


def test_stream_matches_generate(lm):
    decoder, params, _ = lm
    kw = dict(max_new_tokens=6, stop_tokens=())
    streamed = list(decode.stream(decoder, params, PROMPTS[0], **kw))
    assert streamed == decode.generate(decoder, params, PROMPTS[:1], **kw)[0]
    kw.update(method="sample", top_k=3, temperature=3.0, rng=3)  # test_sampling_filters' compile
    steps = list(decode.stream(decoder, params, PROMPTS, **kw))
    assert [list(col) for col in zip(*steps)] == decode.generate(decoder, params, PROMPTS, **kw)
    # Stopped rows yield None; a single prompt's stream ends at its stop token.
    stop = decode.generate(decoder, params, PROMPTS[:1], max_new_tokens=6, stop_tokens=())[0][1]
    assert len(list(decode.stream(decoder, params, PROMPTS[0], max_new_tokens=6, stop_tokens=(stop,)))) == 1


def test_scanned_cache_select():
    model = _small(scan_layers=True)
    cache = llama.init_cache(model, 2)
    cache = jax.tree.map(lambda x: x + jnp.arange(2).reshape((1, 2) + (1,) * (x.ndim - 2)).astype(x.dtype)
                         if x.ndim > 1 else x, cache)
    picked = decode.LlamaDecoder(model).select(cache, jnp.array([1, 1, 0]))
    assert picked["layers"]["attn"]["cached_key"].shape == (2, 3, MAX_LEN, 2, 8)
    np.testing.assert_array_equal(picked["layers"]["attn"]["cached_segment"][0, :, 0], [1, 1, 0])
    assert picked["layers"]["attn"]["cache_index"].shape == (2,)


def test_errors(lm):
    decoder, params, _ = lm
    with pytest.raises(ValueError, match="do not fit"):
        decode.generate(decoder, params, [[2] * 30], max_new_tokens=4)
    with pytest.raises(ValueError, match="method"):
        decode.generate(decoder, params, [[2]], max_new_tokens=4, method="nucleus")
    with pytest.raises(ValueError, match="at least one token"):
        decode.generate(decoder, params, [[]], max_new_tokens=4)


def test_load_for_sampling_and_run_sample(world_cache, tmp_path):
    from vlm_jax import config as config_lib
    from vlm_jax.data.tokenizer import Tokenizer
    from vlm_jax.sampling import sample
    from vlm_jax.train import optim
    from vlm_jax.train.checkpoint import Checkpointer

    config = config_lib.load(
        "configs/llama.py:tiny",
        {
            "tokenizer.path": str(world_cache / "tokenizer.model"),
            "model.width": 32, "model.depth": 1, "model.heads": 2, "model.kv_heads": 1,
            "model.mlp_dim": 64, "model.max_len": 24,
        },
    )
    model = llama.from_config(config.model)
    tx = optim.make_optimizer(config.optim, int(config.train.steps))
    state = init_state(model, tx, jax.random.key(1), (jnp.zeros((1, 8), jnp.int32),))
    state = nn.unbox(state)
    state["params"]["lm_head"]["kernel"] *= 30.0  # peaked: a few real words before eos
    checkpointer = Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(3, state, {}, config, force=True)
    checkpointer.close()
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))

    loaded_config, loaded_model, params, tokenizer = sample.load_for_sampling(str(tmp_path))
    assert loaded_model == model and json.loads(config_lib.to_json(loaded_config)) == json.loads(
        config_lib.to_json(config)
    )
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, b)
    assert isinstance(tokenizer, Tokenizer)

    out = io.StringIO()
    text = sample.run_sample(str(tmp_path), "a red", max_new_tokens=10, out=out)
    ids = [tokenizer.bos_id] + tokenizer.encode("a red")
    expected = decode.stream(decode.LlamaDecoder(model), params, ids, max_new_tokens=10, stop_tokens=[tokenizer.eos_id])
    assert text == tokenizer.decode(list(expected)) and out.getvalue() == text + "\n"


def test_emit_holds_back_partial_characters():
    from vlm_jax.sampling.sample import _emit

    out = io.StringIO()
    shown = ""
    for text in ["he", "hel\ufffd", "hello", "hello w"]:
        shown = _emit(out, shown, text)
    assert out.getvalue() == "hello w" and shown == "hello w"


def test_load_for_sampling_fills_in_frozen_params(world_cache, tmp_path):
    """A LoRA run checkpoints only its adapters; the base weights come back from the seed."""
    from vlm_jax import config as config_lib
    from vlm_jax.layers import lora
    from vlm_jax.sampling import sample
    from vlm_jax.train.checkpoint import Checkpointer

    config = config_lib.load(
        "configs/llama.py:tiny",
        {
            "tokenizer.path": str(world_cache / "tokenizer.model"),
            "model.width": 32, "model.depth": 1, "model.heads": 2, "model.kv_heads": 1,
            "model.mlp_dim": 64, "model.max_len": 24, "model.lora.rank": 2,
        },
    )
    model = llama.from_config(config.model)
    rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]
    full = nn.unbox(jax.jit(lambda r: model.init({"params": r, "dropout": r}, jnp.zeros((1, 1), jnp.int32)))(rng))
    full = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 1.0 if lora.is_adapter(path) else x, full["params"]
    )
    adapters = lora.subset(full, lora.trainable_mask(full, adapters_only=True))
    checkpointer = Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(1, {"params": adapters, "step": jnp.int32(1)}, {}, config, force=True)
    checkpointer.close()
    _, _, params, _ = sample.load_for_sampling(str(tmp_path), config)
    assert jax.tree.structure(params) == jax.tree.structure(full)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full)):
        np.testing.assert_array_equal(a, b)


def test_load_for_sampling_points_a_run_of_stages_at_its_stages(tmp_path):
    from vlm_jax.sampling import sample

    for stage in ("encoder", "caption"):
        (tmp_path / stage / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"a run of stages\? pass one of them: .*caption, .*encoder"):
        sample.load_for_sampling(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in \S+$"):
        sample.load_for_sampling(str(tmp_path / "encoder"))
