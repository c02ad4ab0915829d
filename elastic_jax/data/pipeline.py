"""Packed token batches for the training loop, from the synthetic tasks or from text files, with exact resume.

Documents are tokenized, each followed by the tokenizer's end-of-document id, concatenated, and split into rows of
``seq_len + 1`` tokens (inputs and shifted targets). There is no attention reset at document boundaries: a row may
hold the end of one document and the start of the next, and the model sees the end-of-document id between them.
No token is dropped or repeated: within an epoch every token appears exactly once, and the stream runs on into the
next epoch instead of padding the last row.

The iterator's state is three integers, ``{"epoch", "document", "offset"}``: the position, in this process's
document order, of the next token. A resumed iterator yields exactly the batches an uninterrupted one would.

Document order: the synthetic tasks are an endless stream (example ``i`` is already a fresh random draw); a file
corpus is reshuffled every epoch with a ``grain.MapDataset`` (lazy, random access, seeded by seed, stage and epoch).
With ``process_count`` processes, process ``p`` takes positions ``p, p + process_count, ...`` of the shared order,
so processes see disjoint documents, and a stage's ``batch_size`` is the global batch: each process packs
``batch_size / process_count`` rows (by default the process index and count are JAX's, so a multi-host run needs no
extra arguments; index 0 of count 1 gives every process the same full batches, for computations replicated on each).
Packing itself is a plain iterator: its state stays small and JSON-able.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping, Protocol, Sequence

import grain
import numpy as np

from elastic_jax.data import tasks
from elastic_jax.data.tokenizer import Tokenizer, check_vocab_fits, load_tokenizer

SOURCE_KINDS = ("tasks", "files")
_TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """Where a run's documents come from.

  Attributes:
    kind: "tasks" (the synthetic reasoning corpus) or "files".
    paths: for "files": ``.jsonl`` files (one JSON object with a ``text`` field per line), other files (each one
      document), or directories (their ``.txt`` and ``.jsonl`` files, sorted).
    stage_tasks: for "tasks": the task settings of stage ``i`` are ``stage_tasks[min(i, len - 1)]``; the default
      makes stage 2 harder and long-context (many distractor lines).
    tokenizer: a Hugging Face ``tokenizer.json`` (or a directory holding one); empty: UTF-8 bytes (vocab 256).
    eos_token: the tokenizer's end-of-document token; empty: the first of the usual names it has.
  """
  kind: str = "tasks"
  paths: tuple[str, ...] = ()
  stage_tasks: tuple[tasks.TaskConfig, ...] = (tasks.TaskConfig(difficulty=1),
                                               tasks.TaskConfig(difficulty=2, distractors=40))
  tokenizer: str = ""
  eos_token: str = ""

  def __post_init__(self):
    if self.kind not in SOURCE_KINDS:
      raise ValueError(f"data source kind {self.kind!r} must be one of {SOURCE_KINDS}.")
    if self.kind == "files" and not self.paths:
      raise ValueError("data source kind 'files' needs at least one path.")
    if self.kind == "tasks" and not self.stage_tasks:
      raise ValueError("data source kind 'tasks' needs at least one entry in stage_tasks.")
    for name in ("tokenizer", "eos_token"):
      if not isinstance(getattr(self, name), str):
        raise ValueError(f"data.{name}={getattr(self, name)!r} must be a string (empty for the default).")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "SourceConfig":
    """From plain values (e.g. a ConfigDict): ``stage_tasks`` entries may be dicts of TaskConfig fields."""
    values = dict(values)
    for name in ("tokenizer", "eos_token"):
      if values.get(name) is None:
        values.pop(name, None)
      elif isinstance(values[name], os.PathLike):
        values[name] = os.fspath(values[name])
    if "paths" in values:
      paths = values["paths"]
      values["paths"] = (() if not paths else (paths,)) if isinstance(paths, str) else tuple(paths)
    if "stage_tasks" in values:
      values["stage_tasks"] = tuple(
          entry if isinstance(entry, tasks.TaskConfig)
          else tasks.TaskConfig(**{k: tuple(v) if k == "families" else v for k, v in dict(entry).items()})
          for entry in values["stage_tasks"])
    return cls(**values)


class DocumentStream(Protocol):
  """One process's documents, by epoch and position."""

  def epoch_length(self, epoch: int) -> int | None:
    """Documents in ``epoch``; None for an endless stream."""

  def text(self, epoch: int, position: int) -> str: ...


class TaskDocuments:
  """The synthetic training split as an endless stream; this process takes every ``process_count``-th example."""

  def __init__(self, config: tasks.TaskConfig, seed: int, process_index: int = 0, process_count: int = 1):
    _check_process(process_index, process_count)
    self.config, self.seed = config, seed
    self.process_index, self.process_count = process_index, process_count

  def epoch_length(self, epoch: int) -> None:
    return None

  def text(self, epoch: int, position: int) -> str:
    index = position * self.process_count + self.process_index
    return tasks.generate_example(self.config, self.seed, "train", index).text


class FileDocuments:
  """A fixed list of documents, reshuffled each epoch; this process takes every ``process_count``-th of the order."""

  def __init__(self, documents: Sequence[str], seed: int, process_index: int = 0, process_count: int = 1):
    _check_process(process_index, process_count)
    if len(documents) < process_count:
      raise ValueError(f"{len(documents)} documents cannot give each of {process_count} processes at least one.")
    self.documents, self.seed = documents, seed
    self.process_index, self.process_count = process_index, process_count
    self._order_epoch, self._order = None, None

  def _epoch_order(self, epoch: int) -> grain.MapDataset:
    if self._order_epoch != epoch:
      epoch_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
      self._order = (grain.MapDataset.range(len(self.documents)).shuffle(seed=epoch_seed)
                     .slice(slice(self.process_index, None, self.process_count)))
      self._order_epoch = epoch
    return self._order

  def epoch_length(self, epoch: int) -> int:
    return len(self._epoch_order(epoch))

  def text(self, epoch: int, position: int) -> str:
    return self.documents[self._epoch_order(epoch)[position]]


class PackedBatches:
  """Iterator of int32 [batch_size, seq_len + 1] batches packed from a document stream; checkpointable."""

  def __init__(self, documents: DocumentStream, tokenizer: Tokenizer, batch_size: int, seq_len: int):
    self.documents, self.tokenizer = documents, tokenizer
    self.batch_size, self.seq_len = batch_size, seq_len
    self.epoch = self.document = self.offset = 0
    self._cached_key, self._cached_tokens = None, None

  def __iter__(self) -> "PackedBatches":
    return self

  def _document_tokens(self, epoch: int, document: int) -> list[int]:
    if self._cached_key != (epoch, document):
      text = self.documents.text(epoch, document)
      self._cached_tokens = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
      self._cached_key = (epoch, document)
    return self._cached_tokens

  def __next__(self) -> np.ndarray:
    needed = self.batch_size * (self.seq_len + 1)
    pieces, have = [], 0
    while have < needed:
      tokens = self._document_tokens(self.epoch, self.document)
      piece = tokens[self.offset:self.offset + needed - have]
      pieces.append(piece)
      have += len(piece)
      self.offset += len(piece)
      if self.offset == len(tokens):  # document finished: the next one, or the next epoch
        self.document, self.offset = self.document + 1, 0
        if self.document == self.documents.epoch_length(self.epoch):
          self.epoch, self.document = self.epoch + 1, 0
    flat = np.fromiter((t for piece in pieces for t in piece), dtype=np.int32, count=needed)
    return flat.reshape(self.batch_size, self.seq_len + 1)

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self.epoch, "document": self.document, "offset": self.offset}

  def set_state(self, state: Mapping[str, Any]) -> None:
    missing = sorted({"epoch", "document", "offset"} - set(state))
    if missing:
      raise ValueError(f"data iterator state {dict(state)} lacks {missing}.")
    self.epoch, self.document, self.offset = int(state["epoch"]), int(state["document"]), int(state["offset"])


def load_documents(paths: Sequence[str | os.PathLike]) -> list[str]:
  """Documents from text and JSONL files (see :class:`SourceConfig`), in path order."""
  files = []
  for path in paths:
    path = os.fspath(path)
    if os.path.isdir(path):
      found = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(_TEXT_SUFFIXES))
      if not found:
        raise ValueError(f"data directory {path} holds no {' or '.join(_TEXT_SUFFIXES)} files.")
      files.extend(found)
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise FileNotFoundError(f"data path not found: {path}")
  documents = []
  for path in files:
    with open(path, encoding="utf-8") as file:
      content = file.read()
    if not content.strip():
      raise ValueError(f"data file is empty: {path}")
    if path.endswith(".jsonl"):
      documents.extend(_jsonl_texts(path, content))
    else:
      documents.append(content)
  return documents


def _jsonl_texts(path: str, content: str) -> list[str]:
  texts = []
  for number, line in enumerate(content.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}).") from error
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
      raise ValueError(f"{path}:{number}: expected a JSON object with a string 'text' field.")
    texts.append(record["text"])
  return texts


class _StageShape(Protocol):
  batch_size: int
  seq_len: int


def make_stage_data(source_config: SourceConfig | Mapping[str, Any], stage: _StageShape, stage_index: int, *,
                    seed: int, tokenizer: Tokenizer | None = None, vocab_size: int | None = None,
                    process_index: int | None = None, process_count: int | None = None,
                    documents: Sequence[str] | None = None) -> PackedBatches:
  """The training loop's ``make_data``: this process's rows of a stage batch, ``stage.batch_size / process_count`` x
  ``stage.seq_len + 1`` tokens.

  Args:
    source_config: a SourceConfig or its fields as a mapping.
    stage: anything with ``batch_size`` and ``seq_len`` (the loop's Stage).
    stage_index: position of the stage in the curriculum; stages draw from different document orders.
    seed: the run's data seed.
    tokenizer: defaults to ``source_config.tokenizer`` (the byte tokenizer when that is empty).
    vocab_size: the model's vocabulary size; when given, a tokenizer that does not fit is refused.
    process_index, process_count: this process among ``process_count``; each sees a disjoint share of the documents
      and packs its share of the rows. None: ``jax.process_index()`` / ``jax.process_count()``.
    documents: already loaded file documents (saves re-reading the files at each stage); "files" kind only.
  """
  if not isinstance(source_config, SourceConfig):
    source_config = SourceConfig.from_dict(source_config)
  tokenizer = tokenizer if tokenizer is not None else source_tokenizer(source_config)
  if vocab_size is not None:
    check_vocab_fits(tokenizer, vocab_size)
  process_index, process_count = _resolve_process(process_index, process_count)
  if stage.batch_size % process_count:
    name = getattr(stage, "name", None)
    where = f"stage {name!r}: " if name else ""
    raise ValueError(f"{where}batch_size={stage.batch_size} is the global batch, split evenly over {process_count} "
                     f"processes: make it a multiple of {process_count}.")
  stage_seed = int(np.random.SeedSequence([seed, stage_index]).generate_state(1)[0])
  if source_config.kind == "tasks":
    task_config = source_config.stage_tasks[min(stage_index, len(source_config.stage_tasks) - 1)]
    stream = TaskDocuments(task_config, stage_seed, process_index, process_count)
  else:
    if documents is None:
      documents = load_documents(source_config.paths)
    stream = FileDocuments(documents, stage_seed, process_index, process_count)
  return PackedBatches(stream, tokenizer, stage.batch_size // process_count, stage.seq_len)


def data_factory(source_config: SourceConfig | Mapping[str, Any], *, seed: int, tokenizer: Tokenizer | None = None,
                 vocab_size: int | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> Callable[[_StageShape, int], PackedBatches]:
  """``make_stage_data`` with everything but the stage bound: pass it to the loop as ``make_data``.

  File documents are read and checked here, once, so a bad path fails before training starts; so is the tokenizer
  (``tokenizer``, else ``source_config.tokenizer``) against ``vocab_size``.
  """
  if not isinstance(source_config, SourceConfig):
    source_config = SourceConfig.from_dict(source_config)
  tokenizer = tokenizer if tokenizer is not None else source_tokenizer(source_config)
  if vocab_size is not None:
    check_vocab_fits(tokenizer, vocab_size)
  documents = load_documents(source_config.paths) if source_config.kind == "files" else None
  return functools.partial(make_stage_data, source_config, seed=seed, tokenizer=tokenizer,
                           process_index=process_index, process_count=process_count, documents=documents)


def source_tokenizer(source_config: SourceConfig) -> Tokenizer:
  """The tokenizer ``source_config`` names (``tokenizer``, ``eos_token``): UTF-8 bytes when none is named."""
  return load_tokenizer(source_config.tokenizer, source_config.eos_token)

def _resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Explicit values, else JAX's (read when the data is built, after the distributed runtime has started)."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  _check_process(process_index, process_count)
  return process_index, process_count


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
