"""Tokenizers: UTF-8 bytes by default (vocab 256), or a Hugging Face ``tokenizer.json``.

The byte tokenizer maps each UTF-8 byte to its own value, so it fits ``vocab_size=256`` with no extra ids. Byte 0
(NUL) never occurs in the text we train on, so it serves as the end-of-document id (and as padding); text that
contains a NUL is refused rather than silently confused with a document boundary.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

from elastic_jax.data import DataError


class Tokenizer(Protocol):
  """What the pipeline needs from a tokenizer."""
  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as token ids 0..255; id 0 (NUL) ends a document."""
  vocab_size = 256
  eos_id = 0

  def encode(self, text: str) -> list[int]:
    data = text.encode("utf-8")
    if b"\x00" in data:
      raise ValueError("text contains a NUL byte, which the byte tokenizer reserves for end of document.")
    return list(data)

  def decode(self, ids: Sequence[int]) -> str:
    """Bytes up to the first end-of-document id; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD, and so
    does an id past the bytes (a model whose vocabulary is padded beyond 256 can emit one)."""
    data = b"".join(bytes([int(i)]) if 0 <= int(i) < 256 else "\ufffd".encode() for i in ids)
    return data.split(b"\x00", 1)[0].decode("utf-8", errors="replace")


_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "<|im_end|>")


class HFTokenizer:
  """A Hugging Face ``tokenizers`` tokenizer loaded from ``tokenizer.json`` (or a directory holding one)."""

  def __init__(self, path: str | os.PathLike, eos_token: str | None = None):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError as error:
      raise ImportError(f"loading {path} needs the 'tokenizers' package (pip install tokenizers); the default "
                        "byte tokenizer needs nothing.") from error
    if os.path.isdir(path):  # an HF model directory: its tokenizer.json
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path} (expected a tokenizer.json file, or a directory "
                              "holding one).")
    self.path = os.fspath(path)
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(self.path)
    except Exception as error:  # the tokenizers library's own error names no file
      raise DataError(f"tokenizer {self.path} cannot be read ({error}); give an HF tokenizer.json.") from error
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    candidates = (eos_token,) if eos_token is not None else _EOS_CANDIDATES
    ids = [self._tokenizer.token_to_id(token) for token in candidates]
    found = [i for i in ids if i is not None]
    if not found:
      raise DataError(f"tokenizer {path} has none of the end-of-document tokens {list(candidates)}; "
                      "name one with eos_token (config.data.eos_token in the main job).")
    self.eos_id = found[0]

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self._tokenizer.decode(ids)


def load_tokenizer(path: str | os.PathLike | None = None, eos_token: str | None = None) -> Tokenizer:
  """The byte tokenizer when ``path`` is None or empty, else the ``tokenizer.json`` at ``path`` (a file, or a
  directory holding one); ``eos_token`` None or empty picks the first known end-of-document token it has."""
  return HFTokenizer(path, eos_token or None) if path else ByteTokenizer()


def describe(tokenizer: Tokenizer) -> str:
  """A short human-readable name: the file of an HF tokenizer, else the class."""
  path = getattr(tokenizer, "path", None)
  if path:
    return path
  return "byte tokenizer (UTF-8 bytes)" if isinstance(tokenizer, ByteTokenizer) else type(tokenizer).__name__


def check_vocab_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
  """Refuses a tokenizer whose ids would index past the model's embedding table."""
  if tokenizer.vocab_size > vocab_size:
    raise DataError(f"tokenizer has {tokenizer.vocab_size} tokens but model vocab_size={vocab_size} "
                    f"({describe(tokenizer)}): its ids would index past the embedding table. Use the tokenizer the "
                    f"model was trained with, or a model with vocab_size >= {tokenizer.vocab_size}.")
