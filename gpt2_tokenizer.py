"""The GPT-2 tokenizer, built offline from the vocabulary file this project carries.

`tiktoken.get_encoding("gpt2")` downloads its files on first use, and so does
`AutoTokenizer.from_pretrained("gpt2")`; cluster nodes are often offline. We carry the
byte-pair ranks (`gpt2.tiktoken`, identical to tiktoken's r50k_base) and build both the
tiktoken encoding (fast, for data preparation) and a Hugging Face fast tokenizer with the
same ids (saved with every checkpoint) from it.
"""

import hashlib
import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

VOCAB_FILE = Path(__file__).resolve().with_name("gpt2.tiktoken")
VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
MODEL_MAX_LENGTH = 1024


@contextmanager
def _tiktoken_cache_disabled():
    # tiktoken otherwise copies every file it reads into the system temp folder
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous


@lru_cache(maxsize=1)
def load_ranks() -> dict[bytes, int]:
    """The GPT-2 byte-pair ranks, after checking the vocabulary file's hash."""
    if not VOCAB_FILE.is_file():
        raise FileNotFoundError(f"{VOCAB_FILE} is missing: it ships with this repository; restore it with git.")
    digest = hashlib.sha256(VOCAB_FILE.read_bytes()).hexdigest()
    if digest != VOCAB_SHA256:
        raise ValueError(f"{VOCAB_FILE} has sha256 {digest}, expected {VOCAB_SHA256}: the file is corrupt.")
    with _tiktoken_cache_disabled():
        return load_tiktoken_bpe(str(VOCAB_FILE))


@lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding, with no network access."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=load_ranks(),
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


class _CarriedVocabConverter(TikTokenConverter):
    """TikTokenConverter reading our hash-checked ranks instead of fetching a URL."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        return load_ranks()


def get_tokenizer() -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer giving the same ids as `get_encoding()`.

    Like OpenAI's GPT-2 tokenizer it has `<|endoftext|>` as bos/eos/unk and no pad token.
    Text containing the literal string `<|endoftext|>` is encoded as the special token; pass
    `split_special_tokens=True` to match tiktoken's `encode_ordinary`.
    """
    converter = _CarriedVocabConverter(
        vocab_file=str(VOCAB_FILE), pattern=r50k_pat_str, extra_special_tokens={EOT_TOKEN: EOT_ID}
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(),
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=EOT_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
