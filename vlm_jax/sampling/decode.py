"""Autoregressive decoding with a preallocated cache: greedy, sampling (temperature, top-k,
top-p) and beam search, each one jitted loop (jax.lax.while_loop) per shape configuration, for
any model behind the small `Decoder` protocol below.

    decoder = LlamaDecoder(model)
    new = generate(decoder, params, [[2, 17, 5], [2, 9]], max_new_tokens=32)       # greedy
    new = generate(decoder, params, prompts, max_new_tokens=32, method="sample",
                   temperature=0.8, top_k=40, top_p=0.95, rng=0)
    out = generate_detailed(decoder, params, prompts, max_new_tokens=32, method="beam", beam_size=4)
    for tok in stream(decoder, params, [2, 17, 5], max_new_tokens=32): print(tok)

The `Decoder` protocol (the loops know nothing else about the model). A decoder is a static
argument of the jitted functions, so it must be hashable and compare by value (a frozen
dataclass holding a linen module is):

    max_len: int | None
        cache slots per row; a left-padded prompt plus max_new_tokens - 1 must fit (None: no limit,
        e.g. a recurrent decoder whose "cache" is its state).
    init_cache(params, batch_size, context) -> cache
        an empty cache pytree for batch_size rows. `context` is the per-row conditioning the
        caller passed to generate (e.g. images of a captioning model, which an adapter may encode
        here into cross-attention keys/values or an initial recurrent state); None for an LM.
    step(params, cache, tokens [B, T], positions [B, T], valid [B, T]) -> (logits f32 [B, T, V], cache)
        feeds T tokens to every row (the whole left-padded prompt at once, then T = 1 per step).
        positions are per row (0 at each row's first real token); valid False marks padding, which
        must never influence the logits of valid tokens (e.g. never be attended).
    select(cache, rows int [N]) -> cache
        the cache of rows `rows` (a gather along the batch axis): beam search tiles each prompt's
        cache over its beams and reorders beams every step (greedy and sampling never call it).

Batches: prompts of different lengths are left-padded to a common length P (rounded up to a
multiple of 8 where the cache has room, so prompts of similar lengths share one compile); every
row then writes the same cache slot at each step, the last prompt token of every row sits at slot
P - 1, and padding is marked invalid. A row's result is the same as decoding it alone (up to
float rounding of the differently shaped prefill).

Stopping: a row stops at its first token in `stop_tokens` (default: eos = 3); afterwards it emits
pad_id and its outputs no longer change; the loop ends early once every row has stopped, else
after max_new_tokens. Results exclude the stop token.

Beam search keeps, per prompt, `beam_size` alive hypotheses and the `beam_size` best finished
ones (ended by a stop token), and ranks by the GNMT length penalty (Wu et al. 2016, eq. 14
without the coverage term): score = logprob / ((5 + L) / 6) ** length_penalty, where logprob is
the sum of the new tokens' log-probabilities (stop token included) and L the number of new
tokens (stop token included). length_penalty = 0 ranks by total log-prob. Hypotheses alive at
max_new_tokens compete with the finished ones at the end. A prompt stops early once its k-th best
finished score beats the best score its alive beams could still reach.

Compiles and copies: one compile per (decoder, batch size, padded prompt length, max_new_tokens,
method, top_k, beam_size, whether top_p < 1); stop tokens (up to 4 share a shape), pad id,
temperature, top_p, length_penalty and rng are traced. The cache is created inside the jitted
loop and carried by the while_loop, which updates it in place; only the token buffers go back to
the host. `stream` runs a jitted step per token with the cache donated. Beam search gathers the
cache rows of the surviving beams every step (select), as any beam search over a KV cache must.

Log-probabilities are those of the model (log_softmax of the raw logits: no temperature, no
top-k/top-p filtering). Samples use jax.random.fold_in(rng, i) at new token i, so `generate` and
`stream` draw the same tokens for the same rng.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.parallel import hosts

EOS_ID = 3
PAD_ID = 0
METHODS = ("greedy", "sample", "beam")
_PROMPT_MULTIPLE = 8

Cache = Any


class Decoder(Protocol):
    """What the decoding loops need from a model (see the module docstring)."""

    max_len: int | None

    def init_cache(self, params: Any, batch_size: int, context: Any = None) -> Cache: ...

    def step(
        self, params: Any, cache: Cache, tokens: jax.Array, positions: jax.Array, valid: jax.Array
    ) -> tuple[jax.Array, Cache]: ...

    def select(self, cache: Cache, rows: jax.Array) -> Cache: ...


@dataclasses.dataclass
class Beam:
    """One beam-search hypothesis."""

    tokens: list[int]  # new tokens, without the stop token
    score: float  # logprob / ((5 + L) / 6) ** length_penalty
    logprob: float  # sum of the new tokens' log-probs (stop token included)
    stopped: bool  # ended by a stop token (else: reached max_new_tokens)


@dataclasses.dataclass
class Generation:
    """Per prompt: the new tokens (best beam for beam search) and how they came about."""

    tokens: list[list[int]]  # without the stop token
    logprobs: list[float]  # the model's log-prob of the tokens (plus the stop token's, if any)
    stopped: list[bool]  # ended by a stop token (else: reached max_new_tokens)
    beams: list[list[Beam]] | None = None  # beam search: the kept hypotheses, best first


# ----------------------------------------------------------------------------- prompts


def _left_pad(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, max_len: int | None, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> tokens int32 [B, P], positions int32 [B, P], valid bool [B, P], lengths int32 [B]."""
    if not prompts:
        raise ValueError("no prompts")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("every prompt needs at least one token (e.g. bos)")
    longest = max(lengths)
    room = None if max_len is None else max_len - (max_new_tokens - 1)
    if room is not None and longest > room:
        raise ValueError(
            f"a prompt of {longest} tokens and {max_new_tokens} new tokens do not fit the decoder's "
            f"cache of {max_len} slots"
        )
    width = -(-longest // _PROMPT_MULTIPLE) * _PROMPT_MULTIPLE
    if room is not None:
        width = min(width, room)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    positions = np.zeros((len(prompts), width), np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        start = width - len(prompt)
        tokens[row, start:] = np.asarray(prompt, np.int32)
        positions[row, start:] = np.arange(len(prompt))
        valid[row, start:] = True
    return tokens, positions, valid, np.asarray(lengths, np.int32)


def _prefill(decoder: Decoder, params, tokens, positions, valid, context) -> tuple[jax.Array, Cache]:
    """Feeds the left-padded prompts -> (next-token logits f32 [B, V], cache)."""
    cache = decoder.init_cache(params, tokens.shape[0], context)
    logits, cache = decoder.step(params, cache, tokens, positions, valid)
    return logits[:, -1].astype(jnp.float32), cache


def _stop_array(stop_tokens: Sequence[int]) -> np.ndarray:
    """Stop tokens as int32 [4n] padded with -1 (a traced argument: no compile per stop set)."""
    ids = sorted({int(t) for t in stop_tokens})
    if any(t < 0 for t in ids):
        raise ValueError(f"stop tokens must be >= 0, got {ids}")
    out = np.full((max(4, -(-len(ids) // 4) * 4),), -1, np.int32)
    out[: len(ids)] = ids
    return out


def _is_stop(tokens: jax.Array, stop: jax.Array) -> jax.Array:
    return jnp.any(tokens[..., None] == stop, axis=-1)


# ----------------------------------------------------------------------------- greedy / sampling


def filter_logits(
    logits: jax.Array, *, temperature: jax.Array | float = 1.0, top_k: int = 0, top_p: jax.Array | float | None = None
) -> jax.Array:
    """logits f32 [B, V] -> tempered logits with everything outside the top-k (0: no limit) and
    outside the nucleus (smallest set of most likely tokens with mass >= top_p; None: no limit)
    set to -inf. The most likely token always survives."""
    x = logits / temperature
    if top_k > 0 and top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if top_p is not None:
        sorted_x = -jnp.sort(-x, axis=-1)
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        keep = (before < top_p) | (jnp.arange(x.shape[-1]) == 0)
        threshold = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < threshold, -jnp.inf, x)
    return x


def _pick(logits, rng, i, temperature, top_p, *, sample: bool, top_k: int, use_top_p: bool):
    """Next tokens int32 [B] from logits f32 [B, V] (argmax, or a draw with fold_in(rng, i)),
    and their log-probs under the model f32 [B]."""
    if sample:
        x = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p if use_top_p else None)
        tok = jax.random.categorical(jax.random.fold_in(rng, i), x, axis=-1).astype(jnp.int32)
    else:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok, logp


_SAMPLING_STATICS = ("decoder", "sample", "top_k", "use_top_p")


@functools.partial(jax.jit, static_argnames=_SAMPLING_STATICS + ("max_new_tokens",))
def _sampling_loop(
    decoder, params, tokens, positions, valid, lengths, context, rng, temperature, top_p, stop, pad_id,
    *, max_new_tokens, sample, top_k, use_top_p,
):
    """-> out int32 [B, N] (stop token, then pad, after a stop), n int32 [B] (tokens before the
    stop), stopped bool [B], logprob f32 [B]. Cache and buffers live inside the while_loop."""
    b = tokens.shape[0]
    pick = functools.partial(
        _pick, rng=rng, temperature=temperature, top_p=top_p, sample=sample, top_k=top_k, use_top_p=use_top_p
    )
    logits, cache = _prefill(decoder, params, tokens, positions, valid, context)
    tok, logp = pick(logits, i=jnp.int32(0))
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    done = _is_stop(tok, stop)
    n = (~done).astype(jnp.int32)

    def cond(state):
        i, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, done, n, total, out, cache = state
        pos = (lengths + i - 1)[:, None]
        logits, cache = decoder.step(params, cache, tok[:, None], pos, jnp.ones((b, 1), bool))
        new, logp = pick(logits[:, 0].astype(jnp.float32), i=i)
        new = jnp.where(done, pad_id, new)
        total = total + jnp.where(done, 0.0, logp)
        out = jax.lax.dynamic_update_slice(out, new[:, None], (jnp.int32(0), i))
        stopped = ~done & _is_stop(new, stop)
        n = n + (~done & ~stopped).astype(jnp.int32)
        return i + 1, new, done | stopped, n, total, out, cache

    state = (jnp.int32(1), tok, done, n, logp, out, cache)
    _, _, done, n, total, out, _ = jax.lax.while_loop(cond, body, state)
    return out, n, done, total


# ----------------------------------------------------------------------------- beam search


def _gnmt_penalty(length, alpha):
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=("decoder", "max_new_tokens", "beam_size"))
def _beam_loop(
    decoder, params, tokens, positions, valid, lengths, context, alpha, stop, pad_id,
    *, max_new_tokens, beam_size,
):
    """-> the kept hypotheses per prompt, best first: seqs int32 [B, K, N], scores f32 [B, K],
    logprobs f32 [B, K], n int32 [B, K] (tokens before the stop), stopped bool [B, K]."""
    b, k, steps = tokens.shape[0], beam_size, max_new_tokens
    neg = jnp.float32(-jnp.inf)
    logits, cache = _prefill(decoder, params, tokens, positions, valid, context)
    vocab = logits.shape[-1]
    cache = decoder.select(cache, jnp.repeat(jnp.arange(b), k))
    logits = jnp.repeat(logits, k, axis=0)
    beam_rows = jnp.arange(b)[:, None] * k
    take = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731

    def advance(state, logits, i):
        """Extends the alive beams by the token at index i (alive seqs hold i tokens)."""
        alive_seq, alive_lp, fin, row_done = state
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, vocab)
        cand = (alive_lp[:, :, None] + logp).reshape(b, k * vocab)
        top_lp, top_idx = jax.lax.top_k(cand, 2 * k)  # 2k: k of them survive even if k stop
        src, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        seq = take(alive_seq, src)
        seq = jnp.where(jnp.arange(steps) == i, tok[:, :, None], seq)
        ended = _is_stop(tok, stop)
        # Finished: the best k of the kept ones and the candidates that just stopped.
        new_score = jnp.where(ended & ~row_done[:, None], top_lp / _gnmt_penalty(i + 1, alpha), neg)
        fin = _merge(fin, (seq, new_score, top_lp, jnp.full(tok.shape, i, jnp.int32), ended), k)
        # Alive: the best k candidates that did not stop.
        alive_lp, pick = jax.lax.top_k(jnp.where(ended, neg, top_lp), k)
        alive_seq, alive_tok = take(seq, pick), take(tok, pick)
        rows = (beam_rows + take(src, pick)).reshape(-1)
        # A prompt is done once its k-th finished score beats any score its alive beams could
        # still reach: log-probs only fall, so the best is alive_lp / the largest penalty ahead.
        ahead = jnp.maximum(_gnmt_penalty(i + 1, alpha), _gnmt_penalty(steps, alpha))
        worst = fin[1][:, k - 1]
        row_done = row_done | ((worst > neg) & (worst >= alive_lp[:, 0] / ahead))
        return (alive_seq, alive_lp, fin, row_done), alive_tok.reshape(-1), rows

    alive_lp = jnp.where(jnp.arange(k) == 0, 0.0, neg) * jnp.ones((b, 1))
    fin = (
        jnp.full((b, k, steps), pad_id, jnp.int32), jnp.full((b, k), neg), jnp.full((b, k), neg),
        jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), bool),
    )
    state = (jnp.full((b, k, steps), pad_id, jnp.int32), alive_lp, fin, jnp.zeros((b,), bool))
    state, tok, rows = advance(state, logits, 0)
    cache = decoder.select(cache, rows)
    start = jnp.repeat(lengths, k)

    def cond(carry):
        i, state, *_ = carry
        return (i < steps) & ~jnp.all(state[3])

    def body(carry):
        i, state, tok, cache = carry
        logits, cache = decoder.step(
            params, cache, tok[:, None], (start + i - 1)[:, None], jnp.ones((b * k, 1), bool)
        )
        state, tok, rows = advance(state, logits[:, 0], i)
        return i + 1, state, tok, decoder.select(cache, rows)

    i, state, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), state, tok, cache))
    alive_seq, alive_lp, fin, row_done = state
    # Beams still alive (reached max_new_tokens) compete with the finished ones.
    score = jnp.where(row_done[:, None], neg, alive_lp / _gnmt_penalty(i, alpha))
    fin = _merge(fin, (alive_seq, score, alive_lp, jnp.full((b, k), i, jnp.int32), jnp.zeros((b, k), bool)), k)
    return fin


def _merge(fin, new, k):
    """The k best (by score) of two hypothesis sets (seq, score, logprob, n, stopped)."""
    both = [jnp.concatenate([a, c], axis=1) for a, c in zip(fin, new)]
    _, pick = jax.lax.top_k(both[1], k)
    return tuple(jnp.take_along_axis(x, pick.reshape(pick.shape + (1,) * (x.ndim - 2)), axis=1) for x in both)


# ----------------------------------------------------------------------------- Python API


def _check(method, max_new_tokens, top_k, top_p, beam_size):
    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose {', '.join(METHODS)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: no limit), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")


def _as_key(rng) -> jax.Array:
    if rng is None:
        return jax.random.key(0)
    if isinstance(rng, (int, np.integer)):
        return jax.random.key(int(rng))
    return rng


def _sampling_kwargs(method, temperature, top_k, top_p):
    sample = method == "sample" and temperature > 0
    return dict(sample=sample, top_k=int(top_k) if sample else 0, use_top_p=bool(sample and top_p < 1.0))


def generate_detailed(
    decoder: Decoder,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    method: str = "greedy",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    stop_tokens: Sequence[int] = (EOS_ID,),
    rng: jax.Array | int | None = None,
    pad_id: int = PAD_ID,
    context: Any = None,
) -> Generation:
    """Decodes every prompt (a list of token ids, e.g. [bos] + pieces) in one batch.

    method: "greedy"; "sample" (temperature; 0 means greedy), top_k (0: all), top_p (1: all);
    "beam" (beam_size, GNMT length_penalty alpha; see the module docstring).
    rng: a jax key or an int seed for sampling (None: seed 0). context: per-row conditioning for
    decoder.init_cache (None for an LM).
    """
    _check(method, max_new_tokens, top_k, top_p, beam_size)
    stop, pad = _stop_array(stop_tokens), jnp.int32(pad_id)
    tokens, positions, valid, lengths = _left_pad(prompts, max_new_tokens, decoder.max_len, pad_id)
    if method == "beam":
        seqs, scores, logprobs, n, stopped = hosts.fetch(
            _beam_loop(
                decoder, params, tokens, positions, valid, lengths, context, jnp.float32(length_penalty), stop, pad,
                max_new_tokens=int(max_new_tokens), beam_size=int(beam_size),
            )
        )
        beams = [
            [
                Beam(seqs[r, j, : n[r, j]].tolist(), float(scores[r, j]), float(logprobs[r, j]), bool(stopped[r, j]))
                for j in range(seqs.shape[1])
                if np.isfinite(scores[r, j])
            ]
            for r in range(seqs.shape[0])
        ]
        return Generation(
            tokens=[rb[0].tokens for rb in beams],
            logprobs=[rb[0].logprob for rb in beams],
            stopped=[rb[0].stopped for rb in beams],
            beams=beams,
        )
    out, n, stopped, logprob = hosts.fetch(
        _sampling_loop(
            decoder, params, tokens, positions, valid, lengths, context, _as_key(rng), jnp.float32(temperature),
            jnp.float32(top_p), stop, pad, max_new_tokens=int(max_new_tokens),
            **_sampling_kwargs(method, temperature, top_k, top_p),
        )
    )
    return Generation(
        tokens=[out[r, : n[r]].tolist() for r in range(out.shape[0])],
        logprobs=[float(x) for x in logprob],
        stopped=[bool(x) for x in stopped],
    )


def generate(decoder: Decoder, params: Any, prompts: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
    """The new tokens per prompt, without the stop token (arguments: `generate_detailed`)."""
    return generate_detailed(decoder, params, prompts, **kwargs).tokens


@functools.partial(jax.jit, static_argnames=_SAMPLING_STATICS)
def _stream_first(decoder, params, tokens, positions, valid, context, rng, temperature, top_p, **statics):
    logits, cache = _prefill(decoder, params, tokens, positions, valid, context)
    tok, _ = _pick(logits, rng, jnp.int32(0), temperature, top_p, **statics)
    return tok, cache


@functools.partial(jax.jit, static_argnames=_SAMPLING_STATICS, donate_argnames=("cache",))
def _stream_next(decoder, params, cache, tok, pos, i, rng, temperature, top_p, **statics):
    ones = jnp.ones(tok.shape + (1,), bool)
    logits, cache = decoder.step(params, cache, tok[:, None], pos[:, None], ones)
    tok, _ = _pick(logits[:, 0].astype(jnp.float32), rng, i, temperature, top_p, **statics)
    return tok, cache


def stream(
    decoder: Decoder,
    params: Any,
    prompts: Sequence[int] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    method: str = "greedy",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    stop_tokens: Sequence[int] = (EOS_ID,),
    rng: jax.Array | int | None = None,
    pad_id: int = PAD_ID,
    context: Any = None,
) -> Iterator[int] | Iterator[list[int | None]]:
    """Like `generate`, one new token per step as soon as it is known.

    One prompt (a list of ints): yields ints, and ends at a stop token (not yielded) or after
    max_new_tokens. A batch (a list of lists): yields a list per step with each row's token, None
    for rows that have stopped. Greedy and sampling run a jitted step per token from Python (the
    cache donated to it); the tokens equal `generate`'s for the same arguments. Beam search cannot
    know its tokens before it ends: it yields the best beam's tokens after the whole search.
    """
    single = len(prompts) > 0 and isinstance(prompts[0], (int, np.integer))
    batch = [list(prompts)] if single else [list(p) for p in prompts]
    _check(method, max_new_tokens, top_k, top_p, beam_size)
    if method == "beam":
        result = generate(
            decoder, params, batch, max_new_tokens=max_new_tokens, method="beam", beam_size=beam_size,
            length_penalty=length_penalty, stop_tokens=stop_tokens, pad_id=pad_id, context=context,
        )
        for step in range(max(map(len, result), default=0)):
            row = [r[step] if step < len(r) else None for r in result]
            yield row[0] if single else row
        return
    stops = {int(t) for t in stop_tokens}
    tokens, positions, valid, lengths = _left_pad(batch, max_new_tokens, decoder.max_len, pad_id)
    key, temp, tp = _as_key(rng), jnp.float32(temperature), jnp.float32(top_p)
    statics = _sampling_kwargs(method, temperature, top_k, top_p)
    tok, cache = _stream_first(decoder, params, tokens, positions, valid, context, key, temp, tp, **statics)
    done = np.zeros(len(batch), bool)
    for i in range(max_new_tokens):
        if i > 0:
            pos = jnp.asarray(lengths + i - 1)
            tok, cache = _stream_next(decoder, params, cache, tok, pos, jnp.int32(i), key, temp, tp, **statics)
        host = np.asarray(hosts.fetch(tok))
        row = []
        for r, t in enumerate(host.tolist()):
            if not done[r] and t in stops:
                done[r] = True
            row.append(None if done[r] else t)
        if done.all():
            return
        if single:
            yield row[0]
        else:
            yield row


# ----------------------------------------------------------------------------- adapters


@dataclasses.dataclass(frozen=True)
class LlamaDecoder:
    """The `Decoder` of a vlm_jax.models.llama.Llama: its KV cache ("cache" collection), with
    `valid` passed as decode segment ids (0: padding, never attended)."""

    model: Any  # vlm_jax.models.llama.Llama

    @property
    def max_len(self) -> int:
        return int(self.model.max_len)

    def init_cache(self, params: Any, batch_size: int, context: Any = None) -> Cache:
        from vlm_jax.models import llama

        del params
        if context is not None:
            raise ValueError("a LLaMA decoder takes no context")
        return llama.init_cache(self.model, batch_size)

    def step(self, params, cache, tokens, positions, valid):
        logits, variables = self.model.apply(
            {"params": params, "cache": cache}, tokens, positions, valid.astype(jnp.int32),
            decode=True, mutable=["cache"],
        )
        return logits, variables["cache"]

    def select(self, cache: Cache, rows: jax.Array) -> Cache:
        # Scanned layers stack the cache over depth: [depth, B, ...]; cache_index has no batch axis.
        axis = 1 if self.model.scan_layers else 0

        def gather(path, x):
            name = getattr(path[-1], "key", None)
            return x if name == "cache_index" else jnp.take(x, rows, axis=axis)

        return jax.tree_util.tree_map_with_path(gather, cache)


def decoder_for(model: Any) -> Decoder:
    """The `Decoder` adapter of a model: LLaMA's, or the one a model's `make_decoder()` returns
    (e.g. the captioners in vlm_jax.models.show_tell / show_attend_tell)."""
    from vlm_jax.models import llama

    if callable(getattr(model, "make_decoder", None)):
        return model.make_decoder()
    if isinstance(model, llama.Llama):
        return LlamaDecoder(model)
    raise TypeError(f"no decoder adapter for {type(model).__name__}; write one (see vlm_jax.sampling.decode)")
