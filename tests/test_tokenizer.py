"""The tokenizer wrapper against transformers' AutoTokenizer on the real Phi-2 tokenizer files."""

import pytest
import torch

import phi2
from phi2.tokenizer import TokenizerError, pad
from tests.conftest import PHI2_FILES, needs_shared

TEXTS = [
    "Hello world",
    "",
    "<|endoftext|>",
    "Fix the following prompt.<|endoftext|>Next",
    "def f(x):\n\tif x:\n\t\treturn [x,  x]\n\treturn None\n",
    "    four spaces, then        eight, then                                 thirty-three",
    "trailing spaces   \n\n\n   and blank lines",
    "naïve café, Zürich, Ελληνικά, 日本語のテキスト, العربية",
    "emoji 🤖🧪👩🏽‍💻 and flags 🇫🇷",
    "numbers 3.14159 and 1,000,000 and 0xDEADBEEF",
    "  leading spaces and\ttabs\t",
    "System: Fix the following prompt. Prompt: write a poem. Answer:",
]


@needs_shared()
def test_ids_match_transformers():
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(PHI2_FILES)
    tok = phi2.load_tokenizer(PHI2_FILES)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids) == text


@needs_shared()
def test_special_ids_and_size():
    tok = phi2.load_tokenizer(PHI2_FILES / "tokenizer.json")
    assert tok.eos_id == tok.bos_id == 50256
    assert tok.vocab_size == 50295
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.encode("a" + " " * 31 + "b")[1] == 50257  # the added 31-space token


@needs_shared()
def test_batch_padding_left_and_right():
    tok = phi2.load_tokenizer(PHI2_FILES)
    ids, mask = tok.encode_batch(["a b c d", "hi there"])  # 4 tokens and 2
    assert ids.shape == mask.shape == (2, 4)
    assert ids[1, :2].tolist() == [tok.pad_id] * 2 and ids[1, 2:].tolist() == tok.encode("hi there")
    assert mask.tolist() == [[True] * 4, [False, False, True, True]]
    ids, mask = pad([[1, 2, 3], [4]], pad_id=0, padding_side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.sum().item() == 4
    assert ids.dtype == torch.long


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        phi2.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        phi2.load_tokenizer(tmp_path)


def test_trained_tokenizer_round_trips_and_is_deterministic(tmp_path):
    texts = [f"Write a {w} about {x}." for w in ("poem", "story", "summary") for x in ("rain", "code", "été")] * 20
    a, b = phi2.train_tokenizer(texts, 300), phi2.train_tokenizer(texts, 300)
    assert a.tokenizer.to_str() == b.tokenizer.to_str()
    assert a.vocab_size <= 300 and a.encode("<|endoftext|>") == [a.eos_id]
    for text in TEXTS:  # bytes never seen in training still round-trip
        assert a.decode(a.encode(text)) == text
    a.save(tmp_path)
    assert phi2.load_tokenizer(tmp_path).encode("Write a poem") == a.encode("Write a poem")
