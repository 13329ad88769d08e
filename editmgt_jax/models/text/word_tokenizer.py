"""A word-level tokenizer for closed-vocabulary instructions (the `synthetic_edits` set).

The default small model conditions on instructions drawn from a word list of about a hundred words
(`editmgt_jax.data.synthetic_edits.SYNTHETIC_VOCAB`), so a lookup table is all it needs: no
sub-word model, no files to download. The pipeline calls a tokenizer as
`tokenize(list[str]) -> dict[str, np.ndarray]` and stores each output `k` as `instruction_<k>`;
`WordTokenizer` is one such callable. `save`/`load` keep the vocabulary in a `vocab.txt` (one word
per line, line number = id) beside a model checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

PAD = "<pad>"
UNK = "<unk>"

# Words are runs of letters and digits; punctuation and case carry no meaning in this vocabulary.
_WORD_RE = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[str]:
  """Lower-cases `text` and splits it into words (runs of `[a-z0-9]`)."""
  return _WORD_RE.findall(text.lower())


class WordTokenizer:
  """Maps instructions to fixed-length word ids.

  Id 0 is padding, id 1 is the unknown word, the vocabulary words follow in the order given.
  Calling the tokenizer on a list of `B` strings returns

    * `ids`:  `[B, max_length] int32`, word ids, padded with 0;
    * `mask`: `[B, max_length] bool`, True on real words.

  Longer instructions are truncated to `max_length` words (the count of truncated inputs is kept in
  `num_truncated`, for reporting). Instances are plain picklable objects, so Grain worker processes
  can run them.
  """

  def __init__(self, vocab: Iterable[str], max_length: int = 24):
    words = list(vocab)
    if len(set(words)) != len(words):
      raise ValueError("WordTokenizer: the vocabulary has duplicate words.")
    bad = [w for w in words if split_words(w) != [w]]
    if bad:
      raise ValueError(
          f"WordTokenizer: vocabulary entries must be single lower-case words, got {bad[:5]}."
      )
    if max_length < 1:
      raise ValueError(f"WordTokenizer: max_length must be >= 1, got {max_length}.")
    self.words: tuple[str, ...] = (PAD, UNK, *words)
    self.ids: dict[str, int] = {w: i for i, w in enumerate(self.words)}
    self.max_length = max_length
    self.num_truncated = 0

  @property
  def pad_id(self) -> int:
    return 0

  @property
  def unk_id(self) -> int:
    return 1

  @property
  def vocab_size(self) -> int:
    """Number of ids, padding and unknown included."""
    return len(self.words)

  def encode(self, text: str | bytes) -> list[int]:
    """Word ids of one instruction, unknown words mapped to `unk_id`, not truncated."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return [self.ids.get(w, 1) for w in split_words(text)]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Joins the words of `ids`, dropping padding."""
    return " ".join(self.words[int(i)] for i in ids if int(i) != 0)

  def __call__(self, texts: Sequence[str | bytes]) -> dict[str, np.ndarray]:
    ids = np.zeros((len(texts), self.max_length), np.int32)
    for row, text in enumerate(texts):
      encoded = self.encode(text)
      if len(encoded) > self.max_length:
        self.num_truncated += 1
        encoded = encoded[: self.max_length]
      ids[row, : len(encoded)] = encoded
    return {"ids": ids, "mask": ids != 0}

  def save(self, path: str) -> None:
    """Writes `vocab.txt`: every id's word, one a line, padding and unknown first."""
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(self.words) + "\n")

  @classmethod
  def load(cls, path: str, max_length: int = 24) -> "WordTokenizer":
    """Reads a `vocab.txt` written by `save`."""
    with open(path, encoding="utf-8") as f:
      words = [line.strip() for line in f if line.strip()]
    if words[:2] != [PAD, UNK]:
      raise ValueError(f"{path}: expected {PAD!r} and {UNK!r} on the first two lines, got {words[:2]}.")
    return cls(words[2:], max_length=max_length)
