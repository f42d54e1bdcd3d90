"""The real OpenAI CLIP BPE tokenizer, offline.

The vocabulary file `bpe_simple_vocab_16e6.txt.gz` (MIT licence, credit: OpenAI CLIP) ships inside
the pinned `open-clip-torch` wheel. It is converted once into `<cache>/clip_tokenizer/` as
`vocab.json` + `merges.txt` and loaded with `transformers.CLIPTokenizer.from_pretrained(dir)`;
nothing is downloaded from a model hub. The vocabulary has 49,408 tokens: 256 byte characters,
the same with `</w>`, one per merge (48,894), then `<|startoftext|>` (49406) and
`<|endoftext|>` (49407), which also serves as padding.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alchemist_jax.data import cache
from alchemist_jax.runtime.io import atomic_write_bytes

START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
START_ID, END_ID = 49406, 49407
VOCAB_SIZE = 49408
_NUM_MERGES = 49152 - 256 - 2  # the lines of the BPE file that CLIP uses


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's reversible map of the 256 byte values to printable characters, in order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = [], 0
    for byte in range(256):
        if byte in printable:
            codes.append(byte)
        else:
            codes.append(256 + extra)
            extra += 1
    # Printable bytes come first, in byte order, then the remapped ones.
    order = printable + [b for b in range(256) if b not in printable]
    return [chr(codes[b]) for b in order]


def vocabulary_dir() -> Path:
    """`<cache>/clip_tokenizer` with `vocab.json` and `merges.txt`, built once from the wheel."""
    target = cache.cache_dir() / "clip_tokenizer"
    if (target / "vocab.json").exists() and (target / "merges.txt").exists():
        return target
    raw = cache.read_wheel_member("open-clip-torch", "open_clip/bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1 : 1 + _NUM_MERGES]
    characters = _bytes_to_unicode()
    tokens = characters + [c + "</w>" for c in characters]
    tokens += ["".join(merge.split()) for merge in merges] + [START_TOKEN, END_TOKEN]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    atomic_write_bytes(
        target / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8")
    )
    atomic_write_bytes(target / "vocab.json", json.dumps(vocab).encode("utf-8"))
    return target


@functools.cache
def load_clip_tokenizer():
    """The `CLIPTokenizer` of the built-in CLIP vocabulary (`vocabulary_dir`), loaded once."""
    # Imported lazily (transformers is slow to import); only its tokenizer is used, so its
    # "PyTorch was not found" notice is noise here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(vocabulary_dir()))


class Tokenizer:
    """CLIP BPE tokenizer producing fixed-length id arrays.

    Each caption becomes `<|startoftext|> tokens... <|endoftext|>`, truncated to `max_length`
    (the end token is kept) and padded with `<|endoftext|>` (49407) to exactly `max_length`.
    """

    def __init__(self, max_length: int = 77):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.max_length = max_length
        self._tokenizer = load_clip_tokenizer()

    @property
    def pad_id(self) -> int:
        return END_ID

    def ids(self, text: str) -> list[int]:
        """Unpadded ids of one caption, with start and end tokens (may exceed max_length)."""
        return self._tokenizer(text)["input_ids"]

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenizes a batch of captions.

        Returns:
          tokens: int32 (B, max_length) ids, padded with 49407.
          mask: bool (B, max_length), True on real tokens (start, text and the first end token).
        """
        encoded = self._tokenizer(
            list(texts),
            max_length=self.max_length,
            truncation=True,
            padding="max_length",
            return_attention_mask=True,
        )
        return (
            np.asarray(encoded["input_ids"], np.int32),
            np.asarray(encoded["attention_mask"], bool),
        )

    def decode(self, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
        """The caption texts of token rows (B, L) with their masks (B, L), special tokens removed
        (the inverse of `__call__` up to whitespace and case)."""
        return [
            self._tokenizer.decode(
                np.asarray(row)[np.asarray(row_mask, bool)].tolist(), skip_special_tokens=True
            ).strip()
            for row, row_mask in zip(tokens, mask)
        ]
