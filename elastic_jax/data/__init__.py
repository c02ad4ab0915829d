"""Data: token sources with checkpointable positions, synthetic reasoning tasks, packing, tokenizers."""


class DataError(ValueError):
  """A data file, folder or tokenizer cannot be used; the message names it (and, for bad bytes, the offset)."""
