"""CLIP byte-level BPE: a small hand-made vocab/merges, ids, packing, decoding, errors, loading by
config, and (with transformers installed) id-for-id parity with transformers' CLIPTokenizer."""

import json
import os

import ml_collections
import numpy as np
import pytest

from vlm_jax.data import clip_bpe
from vlm_jax.data import tokenizer as tokenizer_lib
from vlm_jax.data.clip_bpe import ClipTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Merges by hand, best first, each built from symbols that exist by then (as a trained file is):
# photo, of, cat, dog, don, 't, café ("é" is the two byte symbols "Ã" "©"), hello, world, "!!".
MERGES = [
    "p h", "ph o", "pho t", "phot o</w>", "o f</w>", "c a", "ca t</w>", "d o", "do g</w>", "do n</w>",
    "' t</w>", "ca f", "Ã ©</w>", "caf Ã©</w>", "h e", "l l", "he ll", "hell o</w>", "w o", "wo r",
    "wor l", "worl d</w>", "! !</w>",
]
PARITY_TEXTS = [
    "A photo of a CAT",
    "don't stop, it's I'M we'll they'd you've",
    "Hello,   World!!",
    "3 cats and 42 dogs; 1.5e3 -7",
    "café crème, naïve über-cool l'été",
    "cafe\u0301 (decomposed) \ufb01 ligature \u00bd \u00b2 \u2167",
    "emoji \U0001f600 here\U0001f44d\U0001f3fd",
    "",
    "   ",
    "tab\tnew\nline\u3000ideographic\u00a0nbsp",
    "\u039f\u0394\u039f\u03a3 \u03bf\u03b4\u03bf\u03c2",
    "\u4e2d\u6587\u5b57 \u65e5\u672c\u8a9e\u3067\u3059",
    "\x00ctrl\x1cchars\u200bzero",
    "a <|endoftext|> b <|startoftext|>c",
    "<|ENDOFTEXT|>> !<|endoftext|>>",
    "\u0130stanbul",
]


def write_folder(folder, merges=MERGES, drop=(), special_tokens=None, config=None):
    """vocab.json in CLIP's order (byte symbols, the same with </w>, merge results, bos, eos) + merges.txt."""
    os.makedirs(folder, exist_ok=True)
    base = [c for c in sorted(clip_bpe.bytes_to_unicode().values(), key=ord) if c not in drop]
    tokens = base + [c + "</w>" for c in base] + ["".join(m.split(" ")) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    for name, data in (("special_tokens_map.json", special_tokens), ("tokenizer_config.json", config)):
        if data is not None:
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                json.dump(data, f)
    return vocab


def added(content):  # how transformers writes a special token into these files
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True}


SD1_SPECIALS = {"bos_token": added(BOS), "eos_token": added(EOS), "unk_token": added(EOS), "pad_token": EOS}
SD2_SPECIALS = dict(SD1_SPECIALS, pad_token="!")
SD_CONFIG = {"bos_token": dict(added(BOS), __type="AddedToken"), "pad_token": EOS, "model_max_length": 77,
             "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_bpe")
    out = {"plain": str(root / "plain"), "sd1": str(root / "sd1"), "sd2": str(root / "sd2"),
           "holes": str(root / "holes")}
    out["vocab"] = write_folder(out["plain"])
    write_folder(out["sd1"], special_tokens=SD1_SPECIALS, config=SD_CONFIG)
    write_folder(out["sd2"], special_tokens=SD2_SPECIALS, config=SD_CONFIG)  # the map's "!" wins
    write_folder(out["holes"], drop=("\u00bc", "z"))  # "ü"'s second byte symbol and "z" are unknown
    return out


@pytest.fixture(scope="module")
def tok(folders):
    return ClipTokenizer.load(folders["plain"])


def test_byte_table():
    table = clip_bpe.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(table[b] == chr(b) for b in range(ord("!"), ord("~") + 1))
    assert table[0] == "\u0100" and table[ord(" ")] == "\u0120" and table[0xAD] == "\u0143"
    tokenizers = pytest.importorskip("tokenizers")
    assert set(table.values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())


def test_special_ids_and_vocab_size(tok, folders):
    v = folders["vocab"]
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (v[BOS], v[EOS], v[EOS], v[EOS])
    assert tok.vocab_size == len(v) and v["!"] == 0 and v["!</w>"] == 256  # CLIP's layout
    sd2 = ClipTokenizer.load(folders["sd2"])
    assert sd2.pad_id == 0 and sd2.bos_id == v[BOS] and sd2.model_max_length == 77
    assert ClipTokenizer.load(folders["sd1"]).pad_id == v[EOS]


def test_encode_known_words(tok, folders):
    v = folders["vocab"]
    ids = lambda *tokens: [v[t] for t in tokens]  # noqa: E731
    assert tok.encode("A  photo of a\tCAT") == ids("a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>")
    assert tok.encode("Don't") == ids("don</w>", "'t</w>")
    assert tok.encode("Hello, World!!") == ids("hello</w>", ",</w>", "world</w>", "!!</w>")
    assert tok.encode("CAFÉ") == ids("café</w>".replace("é", "Ã©"))
    assert tok.encode("12 cats") == ids("1</w>", "2</w>", "ca", "t", "s</w>")  # single digits
    assert tok.encode("dogdog") == ids("do", "g", "dog</w>")  # a merge applies everywhere
    assert tok.encode("") == [] and tok.encode(" \n ") == []
    assert tok.encode("a <|endoftext|>b") == ids("a</w>", EOS, "b</w>")  # literal specials
    assert tok.encode_batch(["of", "cat"]) == [ids("of</w>"), ids("cat</w>")]


def test_bpe_cache_gives_same_ids(tok):
    first = tok.encode("hello world hello")
    assert first[0] == first[2] and tok.encode("hello world hello") == first


def test_tokenize_pads_and_truncates(tok, folders):
    v = folders["vocab"]
    out, truncated = tok.tokenize(["a cat", "", "photo of a cat of a dog"], 6, return_truncated=True)
    assert out.dtype == np.int32 and out.shape == (3, 6)
    np.testing.assert_array_equal(out[0], [v[BOS], v["a</w>"], v["cat</w>"], v[EOS], v[EOS], v[EOS]])
    np.testing.assert_array_equal(out[1], [v[BOS]] + [v[EOS]] * 5)
    np.testing.assert_array_equal(out[2], [v[BOS]] + tok.encode("photo of a cat")[:4] + [v[EOS]])
    assert truncated.tolist() == [False, False, True]
    sd2 = ClipTokenizer.load(folders["sd2"])
    np.testing.assert_array_equal(sd2.tokenize(["a cat"], 6)[0], [v[BOS], v["a</w>"], v["cat</w>"], v[EOS], 0, 0])


def test_pad_that_is_a_piece_stays_text(folders):
    # SD 2.x pads with "!" (id 0); a "!" in the prompt is still "!</w>", as in OpenCLIP (not the pad id).
    v, sd2 = folders["vocab"], ClipTokenizer.load(folders["sd2"])
    assert sd2.encode("cat!") == [v["cat</w>"], v["!</w>"]]
    assert sd2.decode([v[BOS], 0, v["cat</w>"], v[EOS], 0, 0]) == "!cat"


def test_decode_round_trip(tok, folders):
    v = folders["vocab"]
    for text in ["a photo of a cat", "hello world", "café", "emoji \U0001f600 ok", "\u4e2d\u6587 \u00fc"]:
        assert tok.decode(tok.tokenize([text], 24)[0]) == text
    assert tok.decode(tok.encode("Hello, World!!")) == "hello , world !!"  # CLIP spaces each word
    assert tok.decode(tok.encode("12")) == "1 2"  # and each digit
    garbage_after_eos = [v[BOS], v["cat</w>"], v[EOS], v["dog</w>"]]
    assert tok.decode(garbage_after_eos) == "cat"
    assert tok.decode([v["cat</w>"], 10**6, -1]) == "cat"  # unknown ids are ignored
    assert tok.pieces([v[BOS], v["ca"], v["t</w>"], v[EOS], v["dog</w>"]]) == ["", "ca", "t</w>"]


def test_load_or_train_picks_clip_bpe(folders):
    config = ml_collections.ConfigDict({"tokenizer": {"path": folders["sd1"], "kind": "clip_bpe", "vocab_size": 0}})
    tok = tokenizer_lib.load_or_train(config, None)
    assert isinstance(tok, ClipTokenizer) and tok.path == folders["sd1"]
    config.tokenizer.kind = "wordpiece"
    with pytest.raises(ValueError, match="wordpiece"):
        tokenizer_lib.load_or_train(config, None)
    config.tokenizer.kind, config.tokenizer.path = "clip_bpe", ""
    with pytest.raises(ValueError, match="tokenizer.path"):
        tokenizer_lib.load_or_train(config, None)
    # Without a kind it is still sentencepiece: a .model file is expected at the path.
    config = ml_collections.ConfigDict({"tokenizer": {"path": folders["sd1"], "vocab_size": 0}})
    with pytest.raises(FileNotFoundError, match="tokenizer model"):
        tokenizer_lib.load_or_train(config, None)


def _broken(tmp_path, name, **changes):
    folder = str(tmp_path / name)
    write_folder(folder, **{k: v for k, v in changes.items() if k in ("merges", "special_tokens")})
    for filename, text in changes.get("files", {}).items():
        path = os.path.join(folder, filename)
        if text is None:
            os.remove(path)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    return folder


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"files": {"vocab.json": None}}, FileNotFoundError, "vocab.json"),
        ({"files": {"merges.txt": None}}, FileNotFoundError, "merges.txt"),
        ({"files": {"vocab.json": "{not json"}}, ValueError, "vocab.json.*not valid JSON"),
        ({"files": {"vocab.json": "[1, 2]"}}, ValueError, "vocab.json.*JSON object"),
        ({"files": {"vocab.json": '{"a": 0, "b": 0}'}}, ValueError, "vocab.json.*share id 0"),
        ({"merges": ["p h", "ph o o"]}, ValueError, "merges.txt.* line 3"),
        ({"files": {"merges.txt": "#version: 0.2\np q\n"}}, ValueError, "merges.txt.*'pq'"),
        ({"special_tokens": {"pad_token": "<pad>"}}, ValueError, "pad_token '<pad>'.*special_tokens_map.json"),
        ({"files": {"special_tokens_map.json": "{oops"}}, ValueError, "special_tokens_map.json"),
    ],
    ids=["no-vocab", "no-merges", "vocab-junk", "vocab-list", "vocab-dup", "merge-3", "merge-oov", "pad-oov",
         "map-junk"],
)
def test_errors_name_the_file(tmp_path, changes, error, message):
    with pytest.raises(error, match=message):
        ClipTokenizer.load(_broken(tmp_path, "tok", **changes))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ClipTokenizer.load(tmp_path / "nowhere")


def test_stdlib_pattern_matches_regex_module():
    """Without the `regex` module the stdlib pattern cuts the same words (all assigned BMP characters,
    alone and in runs)."""
    pytest.importorskip("regex")
    import unicodedata

    fast, stdlib = clip_bpe.word_pattern(True), clip_bpe.word_pattern(False)
    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
    texts = PARITY_TEXTS + ["".join(chars), " ".join(chars), "'".join(chars), "7".join(chars)]
    for text in texts:
        assert stdlib.findall(text) == fast.findall(text)


# -- parity with transformers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf(folders):
    transformers = pytest.importorskip("transformers")
    return {name: transformers.CLIPTokenizer.from_pretrained(folders[name]) for name in ("sd1", "sd2", "holes")}


def test_parity_ids(hf, folders):
    for name in ("sd1", "holes"):  # "holes": symbols missing from the vocabulary become unk
        ours = ClipTokenizer.load(folders[name])
        for text in PARITY_TEXTS:
            assert ours.encode(text) == hf[name](text, add_special_tokens=False)["input_ids"], (name, text)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_parity_tokenize_rows(hf, folders, name):
    ours = ClipTokenizer.load(folders[name])
    assert ours.pad_id == hf[name].pad_token_id
    # transformers turns each "!" into the pad id when pad is "!" (see test_pad_that_is_a_piece_stays_text).
    texts = [t for t in PARITY_TEXTS if name == "sd1" or "!" not in t]
    for length in (4, 12, 40):
        expect = hf[name](texts, padding="max_length", max_length=length, truncation=True)["input_ids"]
        np.testing.assert_array_equal(ours.tokenize(texts, length), np.asarray(expect, np.int32))


def test_parity_decode(hf, folders):
    ours = ClipTokenizer.load(folders["sd1"])
    for text in PARITY_TEXTS:
        if "<|" in text:  # transformers skips every eos; decode here stops at the first
            continue
        ids = hf["sd1"](text)["input_ids"]
        assert ours.decode(ids) == hf["sd1"].decode(ids, skip_special_tokens=True), text
