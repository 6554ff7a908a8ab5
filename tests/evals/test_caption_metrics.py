"""COCO caption metrics: hand-computed cases, the tokenizer, edge cases and (optionally) pycocoevalcap."""

import math
import random

import numpy as np
import pytest

from vlm_jax.evals.caption_metrics import compute, tokenize


def _close(a, b, tol=1e-9):
    return abs(a - b) <= tol


# ---------------------------------------------------------------------------------------------- BLEU


def test_bleu_brevity_penalty():
    # Unigrams a, b, d of 4 match; bigram "a b" of 3 matches; c = 4 < r = 6.
    m = compute({0: ["a b c d e f"]}, {0: "a b x d"})
    bp = math.exp(1 - 6 / 4)
    assert _close(m["BLEU-1"], 0.75 * bp)
    assert _close(m["BLEU-2"], math.sqrt(0.75 * (1 / 3)) * bp)
    assert m["BLEU-3"] < 1e-4 and m["BLEU-4"] < 1e-4  # No 3-gram matches: only the 1e-15 smoothing.


def test_bleu_closest_reference_length_prefers_shorter_on_tie():
    # Reference lengths 6 and 2 are both 2 away from 4: the shorter one is used, so no penalty.
    m = compute({0: ["a b c d e f", "a b"]}, {0: "a b x d"})
    assert _close(m["BLEU-1"], 0.75)
    assert _close(m["BLEU-2"], 0.5)


def test_bleu_clipping_and_corpus_level():
    # "the" is clipped to its max count in one reference (1 of 3); corpus level pools the counts.
    m = compute({0: ["the cat"], 1: ["a dog runs"]}, {0: "the the the", 1: "a dog runs"})
    # unigrams: 1/3 + 3/3 -> 4/6; c = 6, r = 2 + 3 = 5 -> no penalty.
    assert _close(m["BLEU-1"], 4 / 6)
    # bigrams: 0/2 + 2/2 -> 2/4
    assert _close(m["BLEU-2"], math.sqrt(4 / 6 * 2 / 4))
    per = compute({0: ["the cat"], 1: ["a dog runs"]}, {0: "the the the", 1: "a dog runs"}, per_id=True)["per_id"]
    assert _close(per[0]["BLEU-1"], 1 / 3) and _close(per[1]["BLEU-3"], 1.0)
    # No 4-grams in a 3-word caption: the smoothing gives (1e-15 / 1e-9) ** (1/4), as in pycocoevalcap.
    assert _close(per[1]["BLEU-4"], (1e-15 / 1e-9) ** 0.25)


# ------------------------------------------------------------------------------------------- ROUGE-L


def test_rouge_l():
    # LCS("a b c d", "a c e d f") = "a c d": P = 3/4, R = 3/5.
    m = compute({0: ["a c e d f", "x y"]}, {0: "a b c d"})
    p, r, b2 = 3 / 4, 3 / 5, 1.2**2
    assert _close(m["ROUGE-L"], (1 + b2) * p * r / (r + b2 * p))
    assert _close(compute({0: ["a b"]}, {0: "a b"})["ROUGE-L"], 1.0)


def test_rouge_l_max_p_and_r_from_different_references():
    # P from ref 1 (LCS 2 / cand 2 = 1), R from ref 2 (LCS 1 / len 1 = 1): pycocoevalcap takes the maxima separately.
    m = compute({0: ["a b c d", "b"]}, {0: "a b"})
    assert _close(m["ROUGE-L"], 1.0)


# --------------------------------------------------------------------------------------------- CIDEr


def test_cider_identical_and_disjoint():
    refs = {0: ["a cat sits on the mat"], 1: ["two dogs run in grass"], 2: ["red bus stops"]}
    m = compute(refs, {0: "a cat sits on the mat", 1: "two dogs run in grass", 2: "red bus stops"}, per_id=True)
    assert _close(m["per_id"][0]["CIDEr"], 10.0) and _close(m["per_id"][1]["CIDEr"], 10.0)
    assert _close(m["per_id"][2]["CIDEr"], 7.5)  # Three words: no 4-grams, that order scores 0.
    assert _close(m["CIDEr"], 27.5 / 3)
    m = compute(refs, {0: "zebra", 1: "zebra zebra", 2: "blue car goes"})
    assert m["CIDEr"] == 0.0


def test_cider_single_id_is_zero():
    # The document frequency comes from the evaluated set: with one id every idf is log(1) - log(1) = 0.
    assert compute({0: ["a cat"]}, {0: "a cat"})["CIDEr"] == 0.0


def _reference_cider(refs, cands, n=4, sigma=6.0):
    """Independent dense implementation of CIDEr-D as computed by pycocoevalcap."""
    vocab, df = {}, {}
    grams = lambda t, k: [tuple(t[i : i + k]) for i in range(len(t) - k + 1)]  # noqa: E731
    for rs in refs:
        seen = {g for r in rs for k in range(1, n + 1) for g in grams(r, k)}
        for g in seen:
            df[g] = df.get(g, 0) + 1
            vocab.setdefault(g, len(vocab))
    for c in cands:
        for k in range(1, n + 1):
            for g in grams(c, k):
                vocab.setdefault(g, len(vocab))
    idf = np.zeros(len(vocab))
    order = np.zeros(len(vocab), int)
    for g, j in vocab.items():
        idf[j] = np.log(len(refs)) - np.log(max(1, df.get(g, 0)))
        order[j] = len(g) - 1

    def tfidf(t):
        v = np.zeros(len(vocab))
        for k in range(1, n + 1):
            for g in grams(t, k):
                v[vocab[g]] += 1
        return v * idf

    scores = []
    for rs, c in zip(refs, cands):
        vc = tfidf(c)
        s = 0.0
        for r in rs:
            vr = tfidf(r)
            pen = np.exp(-((max(len(c) - 1, 0) - max(len(r) - 1, 0)) ** 2) / (2 * sigma**2))
            for k in range(n):
                sel = order == k
                a, b = vc[sel], vr[sel]
                num = np.sum(np.minimum(a, b) * b)
                den = np.linalg.norm(a) * np.linalg.norm(b)
                s += (num / den if den > 0 else num) * pen / n
        scores.append(10 * s / len(rs))
    return scores


def _random_corpus(seed, n_ids=25, n_refs=5):
    rng = random.Random(seed)
    words = "a the man woman dog cat on in of with red blue sitting standing table street ball".split()
    sent = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))  # noqa: E731
    refs = {f"img{i}": [sent() for _ in range(rng.randint(1, n_refs))] for i in range(n_ids)}
    cands = {i: sent() for i in refs}
    return refs, cands


def test_cider_matches_independent_implementation():
    refs, cands = _random_corpus(0)
    ids = list(refs)
    expected = _reference_cider([[r.split() for r in refs[i]] for i in ids], [cands[i].split() for i in ids])
    m = compute(refs, cands, per_id=True)
    np.testing.assert_allclose([m["per_id"][i]["CIDEr"] for i in ids], expected, rtol=1e-10, atol=1e-12)
    assert _close(m["CIDEr"], float(np.mean(expected)))


# ----------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("A man riding a horse.", "a man riding a horse"),
        ("Dogs, cats; birds: fish! Why? Yes...", "dogs cats birds fish why yes"),
        ("TWO Dogs PLAYING", "two dogs playing"),
        ("He don't know, it can't; won't he?", "he do n't know it ca n't wo n't he"),
        ("The dog's ball and the dogs' toys", "the dog 's ball and the dogs toys"),
        ("I'm sure they're here, we've left, I'd go", "i 'm sure they 're here we 've left i 'd go"),
        ("you'll see", "you 'll see"),
        ('A "big" `dog\' -- running - fast', "a big dog running fast"),
        ("a black-and-white T-shirt at 3.5 o'clock", "a black-and-white t-shirt at 3.5 o'clock"),
        ("1,000 U.S. flags", "1,000 u.s. flags"),
        ("a grey cat in the colourful centre", "a gray cat in the colorful center"),
        ("a cat and/or a dog", "a cat and\\/or a dog"),
        ("isn’t it “nice”…", "is n't it nice"),
        ("", ""),
        (" . , ! ", ""),
    ],
)
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens.split()


def test_tokenize_parentheses():
    # pycocoevalcap lowercases -LRB-/-RRB- and then fails to match its upper-case list: they stay.
    assert tokenize("a cat (black) sits") == ["a", "cat", "-lrb-", "black", "-rrb-", "sits"]
    assert tokenize("a cat (black) [x] {y}", drop_brackets=True) == ["a", "cat", "black", "x", "y"]


def test_tokenized_inside_compute():
    # Case and punctuation do not change the scores.
    a = compute(
        {0: ["A dog runs.", "The dog is running!"], 1: ["Cats, sleeping."]}, {0: "A DOG RUNS!", 1: "cats sleeping"}
    )
    b = compute({0: ["a dog runs", "the dog is running"], 1: ["cats sleeping"]}, {0: "a dog runs", 1: "cats sleeping"})
    assert a == b


# ---------------------------------------------------------------------------------------- edge cases


def test_empty_candidate_scores_zero():
    m = compute({0: ["a dog runs"], 1: ["a cat"]}, {0: "", 1: "..."}, per_id=True)
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert m[k] == 0.0, k
        assert m["per_id"][0][k] == 0.0 and m["per_id"][1][k] == 0.0
    assert set(m) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr", "per_id"}


def test_id_mismatch_raises():
    with pytest.raises(ValueError, match="same ids"):
        compute({0: ["a"], 1: ["b"]}, {0: "a"})
    with pytest.raises(ValueError, match="same ids"):
        compute({0: ["a"]}, {0: "a", 2: "c"})


def test_bad_references_raise():
    with pytest.raises(ValueError, match="non-empty list"):
        compute({0: ["a"], 1: []}, {0: "a", 1: "b"})
    with pytest.raises(ValueError, match="non-empty list"):
        compute({0: "a dog"}, {0: "a dog"})
    with pytest.raises(ValueError, match="no captions"):
        compute({}, {})


# ------------------------------------------------------------------------------------- pycocoevalcap


def test_matches_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs, cands = _random_corpus(1, n_ids=40)
    refs["punct"] = ["A grey dog's (red) ball, isn't it?", "Two DOGS play."]
    cands["punct"] = "A gray dog's ball."
    gts = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in refs.items()}
    res = {i: [" ".join(tokenize(c))] for i, c in cands.items()}
    m = compute(refs, cands, per_id=True)
    ids = list(refs)

    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        assert abs(m[f"BLEU-{k + 1}"] - bleu[k]) < 1e-6
        np.testing.assert_allclose([m["per_id"][i][f"BLEU-{k + 1}"] for i in ids], bleu_per[k], atol=1e-6)
    rouge, rouge_per = Rouge().compute_score(gts, res)
    assert abs(m["ROUGE-L"] - rouge) < 1e-6
    np.testing.assert_allclose([m["per_id"][i]["ROUGE-L"] for i in ids], rouge_per, atol=1e-6)
    cider, cider_per = Cider().compute_score(gts, res)
    assert abs(m["CIDEr"] - cider) < 1e-6
    np.testing.assert_allclose([m["per_id"][i]["CIDEr"] for i in ids], cider_per, atol=1e-6)
