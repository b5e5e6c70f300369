"""The offline GPT-2 tokenizer: hash-checked vocabulary, tiktoken and HF give the same ids."""

import hashlib

import pytest

import gpt2_tokenizer
from gpt2_tokenizer import EOT_ID, VOCAB_FILE, VOCAB_SHA256, get_encoding, get_tokenizer

VARIED_TEXTS = [
    "Hello, I'm a language model,",
    "naïve café, Straße, 東京タワー, Привет мир, مرحبا",
    "emoji 🤖🎉👍🏽 and ZWJ 👨‍👩‍👧",
    "  leading spaces,\ttabs,\n\nnewlines   and trailing   ",
    "\r\n\r\n    indented\r\n",
    "digits 0 12 345 6789 3.14159 1,000,000 2026-11-24",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\nclass A(B): pass",
    "it's they're we've I'll you'd don't SHOUTING'S",
    "<|endoftext|> appears as plain text here",
    "",
]


def test_vocab_file_is_the_published_gpt2_vocabulary():
    assert hashlib.sha256(VOCAB_FILE.read_bytes()).hexdigest() == VOCAB_SHA256
    assert VOCAB_SHA256 == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def test_known_gpt2_ids():
    # build-nanogpt's prompt and its well-known GPT-2 ids
    assert get_encoding().encode_ordinary("Hello, I'm a language model,") == [
        15496,
        11,
        314,
        1101,
        257,
        3303,
        2746,
        11,
    ]
    assert get_encoding().n_vocab == 50257 and get_encoding().eot_token == EOT_ID


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_hf_tokenizer_matches_tiktoken(text):
    encoding, tokenizer = get_encoding(), get_tokenizer()
    ids = encoding.encode_ordinary(text)
    assert tokenizer(text, split_special_tokens=True)["input_ids"] == ids
    assert tokenizer.decode(ids) == encoding.decode(ids) == text


def test_special_token_and_gpt2_conventions():
    tokenizer = get_tokenizer()
    assert tokenizer("a<|endoftext|>b")["input_ids"] == [64, EOT_ID, 65]
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == EOT_ID
    assert tokenizer.pad_token is None and len(tokenizer) == 50257


def test_corrupt_vocabulary_file_is_refused(tmp_path, monkeypatch):
    corrupt = tmp_path / "gpt2.tiktoken"
    corrupt.write_bytes(VOCAB_FILE.read_bytes()[:-10])
    monkeypatch.setattr(gpt2_tokenizer, "VOCAB_FILE", corrupt)
    gpt2_tokenizer.load_ranks.cache_clear()
    try:
        with pytest.raises(ValueError, match="gpt2.tiktoken has sha256"):
            gpt2_tokenizer.load_ranks()
    finally:
        gpt2_tokenizer.load_ranks.cache_clear()
