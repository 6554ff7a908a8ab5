"""COCO-caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D) in pure Python, no Java.

    compute(references, candidates)                -> {"BLEU-1": ..., ..., "BLEU-4", "ROUGE-L", "CIDEr"}
    compute(references, candidates, per_id=True)   -> the same plus "per_id": {id: {metric: score}}

`references` is {id: [caption, ...]} and `candidates` is {id: caption}: pycocoevalcap's gts/res shape,
with raw strings (not its {"caption": ...} dicts). Both must have the same ids and every id at least one
reference, otherwise ValueError. Captions are tokenised with `tokenize` (below) unless
`pretokenized=True`, in which case they are split on whitespace as pycocoevalcap's scorers do with the
output of its PTBTokenizer.

The scores follow pycocoevalcap's scorers (formulas re-derived from its source, not copied):

* BLEU-n (Bleu(4), option "closest"): corpus level. Clipped n-gram matches and candidate n-gram counts
  are summed over all ids; the reference length of an id is the length of its reference closest to the
  candidate's length (ties: the shorter one); precisions are smoothed as (matches + 1e-15) /
  (guesses + 1e-9); BLEU-n = (p1 * ... * pn) ** (1/n), times exp(1 - r/c) when c < r (c, r the summed
  candidate/reference lengths, also smoothed as (c + 1e-15) / (r + 1e-9)). Per-id BLEU is the same
  formula on one id.
* ROUGE-L (Rouge): per id, P = max over references of LCS/len(candidate), R = max of LCS/len(reference),
  score = (1 + b^2) P R / (R + b^2 P) with b = 1.2 (0 when P or R is 0); mean over ids.
* CIDEr (Cider, i.e. CIDEr-D): n = 1..4, TF-IDF vectors of raw n-gram counts with
  idf = log(number of ids) - log(max(1, df)), df = number of ids whose references contain the n-gram;
  per reference sum over hypothesis n-grams of min(v_hyp, v_ref) * v_ref / (|v_hyp| |v_ref|) (the
  CIDEr-D clipping), times exp(-delta^2 / (2 * 6^2)); mean over n, mean over references, x10; mean over
  ids. As in pycocoevalcap, delta is the difference of the *bigram* counts (its "length" counts the
  n-grams of order 2, i.e. len - 1 for non-empty captions), and the document frequency comes from the
  references of the evaluated set only, so CIDEr of a set with one id is always 0.

METEOR is not returned: pycocoevalcap runs the METEOR 1.5 Java jar (exact, stem, WordNet-synonym and
paraphrase matching with tuned parameters), and a faithful reimplementation with WordNet synonyms and
the paraphrase table is out of scope here. SPICE (also Java) is not returned either.

Tokenizer. pycocoevalcap runs Stanford CoreNLP 3.4.1's PTBTokenizer (`-preserveLines -lowerCase`) and
drops the tokens in its PUNCTUATIONS list ('' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;).
`tokenize` is a pure-Python approximation that agrees on ordinary English captions:

* lowercase; split off punctuation (. , ; : ? ! " ' ` and dashes), which is then dropped;
* contractions as PTB: "don't" -> "do n't", "can't" -> "ca n't", "won't" -> "wo n't", "dog's" ->
  "dog 's", also 'm 'd 're 've 'll; "dogs'" -> "dogs"; "o'clock", "o'neil" stay one token;
* hyphenated words ("black-and-white", "t-shirt") and numbers with separators ("1,000", "3.5") stay
  one token; acronyms with periods ("u.s.", "a.m.") keep them;
* like PTBTokenizer with its default options: "/" and "*" are escaped ("and/or" -> "and\\/or"), and
  common British spellings are Americanized (a port of CoreNLP's Americanize list and patterns:
  "grey" -> "gray", "colour" -> "color", "centre" -> "center", ...), only for all-lowercase words as
  CoreNLP does before lowercasing ("Grey" stays "grey");
* brackets become -LRB- -RRB- -LSB- -RSB- -LCB- -RCB-. NOTE: PTBTokenizer's -lowerCase lowercases these
  too ("-lrb-"), and pycocoevalcap's list only has the upper-case forms, so pycocoevalcap KEEPS
  "-lrb-"/"-rrb-" (and "-lsb-", "-rsb-", "-lcb-", "-rcb-") as words. `tokenize` reproduces that by
  default; `tokenize(text, drop_brackets=True)` drops them instead.

Known or possible differences from the Java tokenizer (rare in captions): the abbreviation lists are
reduced (a period is kept only on mr/mrs/ms/dr/prof/st/jr/sr/mt/vs/etc followed by more text, and on
"no." before a number); runs like "?!" or "!!" and ".." are split into single marks and dropped (Java may
emit one token that survives the filter); "cannot", "gonna" are kept whole (3.4.1 default);
emoticons, URLs, e-mail addresses, SGML, ellipsis spacing variants, "&" inside words ("at&t" kept
whole) and non-ASCII punctuation other than curly quotes, dashes and "…" may tokenise differently;
curly apostrophes are normalised to "'" ("don’t" -> "do n't").
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

# Tokens pycocoevalcap removes after tokenisation (compared against the lowercased tokens, so the
# upper-case bracket forms never match; see the module docstring).
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_BRACKET_TOKENS = frozenset(_BRACKETS.values())

# Ordered alternatives, tried at each position after whitespace (first match wins).
_TOKEN_RE = re.compile(
    r"""
    (?P<drop>\.{2,}|-{2,})                                           # ellipses, dashes: dropped
  | (?P<acro>[A-Za-z](?:\.[A-Za-z])+\.?)                             # u.s. a.m. e.g.
  | (?P<abbr>(?i:mrs?|ms|dr|prof|st|jr|sr|mt|vs|etc)\.(?=\s+\S)
            |(?i:no)\.(?=\s*\d))                                     # abbreviations keeping their period
  | (?P<neg>[A-Za-z]*[A-MO-Za-mo-z](?=[nN]'[tT](?![A-Za-z])))        # do|n't  ca|n't
  | (?P<nt>[nN]'[tT](?![A-Za-z]))
  | (?P<apoword>[dDoOlL]'[^\W_]+|'(?i:em|till?|cause)(?![A-Za-z]))   # o'clock d'artagnan 'em
  | (?P<number>\d+(?:[.,:]\d+)+)                                     # 1,000 3.5 4:45
  | (?P<word>[^\W_]+(?:[-/&][^\W_]+)*)                               # words, hyphenated, and/or
  | (?P<redaux>'(?:[sSmMdD]|re|RE|Re|ve|VE|Ve|ll|LL|Ll)(?![A-Za-z]))  # 's 'm 'd 're 've 'll
  | (?P<quote>["'`])                                                   # quotes: dropped
  | (?P<other>\S)                                                     # any other single character
    """,
    re.VERBOSE,
)
_SPACE_RE = re.compile(r"\s+")
_CHAR_MAP = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u00b4": "'", "\u201c": '"',
                           "\u201d": '"', "\u201e": '"', "\u2013": "--", "\u2014": "--", "\u2015": "--",
                           "\u2026": "..."})

# CoreNLP Americanize: exact-word mapping (words of length >= 4) and patterns (length >= 6).
_AMERICANIZE_PAIRS = """
anaesthetic anesthetic analogue analog analogues analogs analyse analyze analysed analyzed
analysing analyzing armoured armored cancelled canceled cancelling canceling candour candor
capitalise capitalize capitalised capitalized capitalisation capitalization centre center
chimaeric chimeric clamour clamor coloured colored colouring coloring colourful colorful
defence defense Defence Defense discolour discolor discolours discolors discoloured discolored
discolouring discoloring encyclopaedia encyclopedia endeavour endeavor endeavours endeavors
endeavoured endeavored endeavouring endeavoring fervour fervor favour favor favours favors
favoured favored favouring favoring favourite favorite favourites favorites fibre fiber
fibres fibers finalise finalize finalised finalized finalising finalizing flavour flavor
flavours flavors flavoured flavored flavouring flavoring glamour glamour grey gray harbour harbor
harbours harbors homologue homolog homologues homologs honour honor honours honors honoured
honored honouring honoring honourable honorable humour humor humours humors humoured humored
humouring humoring kerb curb labelled labeled labelling labeling labour labor Labour Labor
labours labors laboured labored labouring laboring leant leaned learnt learned localise localize
localised localized manoeuvre maneuver manoeuvres maneuvers maximise maximize maximised maximized
maximising maximizing meagre meager minimise minimize minimised minimized minimising minimizing
modernise modernize modernised modernized modernising modernizing misdemeanour misdemeanor
misdemeanours misdemeanors neighbour neighbor neighbours neighbors neighbourhood neighborhood
neighbourhoods neighborhoods oestrogen estrogen oestrogens estrogens organisation organization
organisations organizations penalise penalize penalised penalized popularise popularize
popularised popularized popularises popularizes popularising popularizing practise practice
practised practiced pressurise pressurize pressurised pressurized pressurises pressurizes
pressurising pressurizing realise realize realised realized realising realizing realises realizes
recognise recognize recognised recognized recognising recognizing recognises recognizes
rumoured rumored rumouring rumoring savour savor savours savors savoured savored savouring
savoring splendour splendor splendours splendors theatre theater theatres theaters titre titer
titres titers travelled traveled travelling traveling
""".split()
_AMERICANIZE = dict(zip(_AMERICANIZE_PAIRS[0::2], _AMERICANIZE_PAIRS[1::2]))
_OUR_EXCEPTIONS = re.compile(
    "abatjour|beflour|bonjour|calambour|carrefour|cornflour|contour|de[tv]our|dortour|dyvour|downpour|"
    "giaour|glamour|holour|inpour|outpour|pandour|paramour|pompadour|recontour|repour|ryeflour|sompnour|"
    "tambour|troubadour|tregetour|velour"
)
_AMERICANIZE_PATTERNS = [
    (re.compile(r"haem(at)?o"), lambda m: "hem" + (m.group(1) or "") + "o", None),
    (re.compile(r"aemia$"), lambda m: "emia", None),
    (re.compile(r"([lL])eukaem"), lambda m: m.group(1) + "eukem", None),
    (re.compile(r"programme(s?)$"), lambda m: "program" + m.group(1), None),
    (re.compile(r"^([a-z]{3,})our(s?)$"), lambda m: m.group(1) + "or" + m.group(2), _OUR_EXCEPTIONS),
]


def americanize(word: str) -> str:
    """CoreNLP's Americanize on one word (case-sensitive, as it is applied before lowercasing)."""
    if len(word) < 4:
        return word
    if word in _AMERICANIZE:
        return _AMERICANIZE[word]
    if len(word) < 6:
        return word
    for pattern, repl, exceptions in _AMERICANIZE_PATTERNS:
        if pattern.search(word):
            if exceptions is not None and exceptions.search(word):
                continue
            return pattern.sub(repl, word)
    return word


def tokenize(text: str, drop_brackets: bool = False) -> list[str]:
    """PTB-style tokens of one caption, lowercased, with pycocoevalcap's punctuation removed."""
    text = text.translate(_CHAR_MAP)
    tokens = []
    pos, n = 0, len(text)
    while pos < n:
        space = _SPACE_RE.match(text, pos)
        if space:
            pos = space.end()
            continue
        m = _TOKEN_RE.match(text, pos)
        pos = m.end()
        kind, tok = m.lastgroup, m.group()
        if kind in ("drop", "quote"):
            continue
        if kind == "other" and tok in _BRACKETS:
            if not drop_brackets:
                tokens.append(_BRACKETS[tok])
            continue
        if kind == "word" and tok.isalpha():
            tok = americanize(tok)
        tok = tok.lower().replace("/", "\\/").replace("*", "\\*")
        if tok not in PUNCTUATIONS:
            tokens.append(tok)
    if drop_brackets:
        tokens = [t for t in tokens if t not in _BRACKET_TOKENS]
    return tokens


# ----------------------------------------------------------------------------------------------------
# Scorers on token lists.


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of all n-grams of orders 1..n (tuples)."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


def _bleu_from_stats(correct, guess, testlen, reflen, n):
    tiny, small = 1e-15, 1e-9
    scores, prod = [], 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu(refs: Sequence[Sequence[Sequence[str]]], cands: Sequence[Sequence[str]], n: int = 4):
    """(corpus [BLEU-1..n], per-item [[BLEU-1..n], ...]) as pycocoevalcap's Bleu (option 'closest')."""
    tot_correct, tot_guess, tot_test, tot_ref = [0] * n, [0] * n, 0, 0
    per_item = []
    for rs, c in zip(refs, cands):
        maxref: dict = {}
        for r in rs:
            for g, cnt in _ngrams(r, n).items():
                if cnt > maxref.get(g, 0):
                    maxref[g] = cnt
        testlen = len(c)
        reflen = min((abs(len(r) - testlen), len(r)) for r in rs)[1]
        guess = [max(0, testlen - k) for k in range(n)]
        correct = [0] * n
        for g, cnt in _ngrams(c, n).items():
            correct[len(g) - 1] += min(maxref.get(g, 0), cnt)
        per_item.append(_bleu_from_stats(correct, guess, testlen, reflen, n))
        for k in range(n):
            tot_correct[k] += correct[k]
            tot_guess[k] += guess[k]
        tot_test += testlen
        tot_ref += reflen
    return _bleu_from_stats(tot_correct, tot_guess, tot_test, tot_ref, n), per_item


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(refs: Sequence[Sequence[str]], cand: Sequence[str], beta: float = 1.2) -> float:
    """ROUGE-L of one candidate as pycocoevalcap's Rouge.calc_score (0 for an empty candidate)."""
    if not cand:
        return 0.0
    prec = rec = 0.0
    for r in refs:
        lcs = _lcs(r, cand)
        prec = max(prec, lcs / len(cand))
        rec = max(rec, lcs / len(r) if r else 0.0)
    if prec == 0 or rec == 0:
        return 0.0
    return (1 + beta**2) * prec * rec / (rec + beta**2 * prec)


def cider_d(
    refs: Sequence[Sequence[Sequence[str]]], cands: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-item CIDEr-D as pycocoevalcap's Cider (document frequency from `refs`)."""
    ref_counts = [[_ngrams(r, n) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rcs in ref_counts:
        df.update(set().union(*rcs))
    log_num_docs = math.log(float(len(refs)))

    def vec(counts):
        v = [{} for _ in range(n)]
        norm = [0.0] * n
        bigrams = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = tf * (log_num_docs - math.log(max(1.0, df.get(g, 0.0))))
            v[k][g] = w
            norm[k] += w * w
            if k == 1:
                bigrams += tf
        return v, [math.sqrt(x) for x in norm], bigrams

    scores = []
    for rcs, c in zip(ref_counts, cands):
        vh, nh, lh = vec(_ngrams(c, n))
        total = [0.0] * n
        for rc in rcs:
            vr, nr, lr = vec(rc)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(rcs) * 10.0)
    return scores


# ----------------------------------------------------------------------------------------------------


def _check(references: Mapping[Any, Sequence[str]], candidates: Mapping[Any, Any]) -> list:
    ref_ids, cand_ids = set(references), set(candidates)
    if ref_ids != cand_ids:
        missing = sorted(map(repr, ref_ids - cand_ids))[:5]
        extra = sorted(map(repr, cand_ids - ref_ids))[:5]
        raise ValueError(
            f"references and candidates must have the same ids: {len(ref_ids - cand_ids)} ids without a "
            f"candidate (e.g. {missing}), {len(cand_ids - ref_ids)} candidates without references (e.g. {extra})"
        )
    if not ref_ids:
        raise ValueError("no captions to score")
    for i, rs in references.items():
        if isinstance(rs, str) or not isinstance(rs, Sequence) or len(rs) == 0:
            raise ValueError(f"id {i!r}: references must be a non-empty list of strings, got {rs!r}")
        if not all(isinstance(r, str) for r in rs):
            raise ValueError(f"id {i!r}: references must be strings, got {rs!r}")
    for i, c in candidates.items():
        if not isinstance(c, str):
            raise ValueError(f"id {i!r}: the candidate must be a string, got {c!r}")
    return list(references)


def compute(
    references: Mapping[Any, Sequence[str]],
    candidates: Mapping[Any, str],
    *,
    per_id: bool = False,
    pretokenized: bool = False,
) -> dict:
    """BLEU-1..4, ROUGE-L and CIDEr(-D) of `candidates` against `references` (see the module docstring)."""
    ids = _check(references, candidates)
    tok = str.split if pretokenized else tokenize
    refs = [[tok(r) for r in references[i]] for i in ids]
    cands = [tok(candidates[i]) for i in ids]
    bleu_corpus, bleu_items = bleu(refs, cands)
    rouge_items = [rouge_l(rs, c) for rs, c in zip(refs, cands)]
    cider_items = cider_d(refs, cands)
    out: dict = {f"BLEU-{k + 1}": float(b) for k, b in enumerate(bleu_corpus)}
    out["ROUGE-L"] = sum(rouge_items) / len(ids)
    out["CIDEr"] = sum(cider_items) / len(ids)
    if per_id:
        out["per_id"] = {
            i: {**{f"BLEU-{k + 1}": b for k, b in enumerate(bi)}, "ROUGE-L": r, "CIDEr": c}
            for i, bi, r, c in zip(ids, bleu_items, rouge_items, cider_items)
        }
    return out
