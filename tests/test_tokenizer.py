"""The offline CLIP BPE tokenizer reproduces the reference CLIP ids."""

import json

import numpy as np
import pytest

from alchemist_jax.data import tokenizer


@pytest.fixture(scope="module")
def tok():
    return tokenizer.Tokenizer(max_length=77)


@pytest.mark.parametrize(
    "text, ids",
    [
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("a photo of a dog", [49406, 320, 1125, 539, 320, 1929, 49407]),
        ("hello world", [49406, 3306, 1002, 49407]),
        ("A Photo  of a CAT", [49406, 320, 1125, 539, 320, 2368, 49407]),  # lower-cased, spaces
        ("123", [49406, 272, 273, 274, 49407]),  # digits are split one by one
        ("", [49406, 49407]),
    ],
)
def test_reference_ids(tok, text, ids):
    assert tok.ids(text) == ids


def test_vocabulary_files():
    folder = tokenizer.vocabulary_dir()
    vocab = json.loads((folder / "vocab.json").read_text())
    assert len(vocab) == tokenizer.VOCAB_SIZE == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["cat</w>"] == 2368
    merges = (folder / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894


def test_batch_padding_truncation_and_mask():
    tok = tokenizer.Tokenizer(max_length=8)
    tokens, mask = tok(["a photo of a cat", "a photo of a cat " * 5])
    assert tokens.dtype == np.int32 and tokens.shape == (2, 8) and mask.dtype == bool
    assert tokens[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert mask[0].tolist() == [True] * 7 + [False]
    assert tokens[1, 0] == 49406 and tokens[1, -1] == 49407  # truncated, end token kept
    assert mask[1].all()
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        tokenizer.Tokenizer(max_length=1)


def test_decode_inverts_tokenization():
    tok = tokenizer.Tokenizer(max_length=16)
    captions = ["a photo of a cat", "a handwritten digit five"]
    tokens, mask = tok(captions)
    assert tok.decode(tokens, mask) == captions
