"""Packed token batches for the training loop, from the synthetic tasks or from text files, with exact resume.

A corpus is one endless sequence of documents (``DocumentStream``): the synthetic tasks draw example ``g`` at
position ``g``; a file corpus lays its epochs end to end, each reshuffled with a ``grain.MapDataset`` (lazy, random
access, seeded by seed, stage and epoch), so every document appears exactly once per epoch.

Row ``r`` of a global batch of ``B`` rows packs its own documents: positions ``r, r + B, r + 2B, ...``, each
tokenized and followed by the tokenizer's end-of-document id, concatenated and cut into ``seq_len + 1`` tokens per
batch (inputs and shifted targets). There is no attention reset at document boundaries: a row may hold the end of one
document and the start of the next, with the end-of-document id between them. No token is dropped or repeated.

A stage's ``batch_size`` is the global batch, and process ``p`` of ``P`` packs only its own block of rows,
``[p B/P, (p + 1) B/P)``. So the global batch is the same whatever the number of processes that read it (a
multi-host run trains on exactly the batches of a single-process run), and each process reads only the documents
of its own rows. By default the process index and count are JAX's; index 0 of count 1 gives every process the same
full batches, for computations replicated on each.

The iterator's state is two integers per row, ``{"rows": [[document, offset], ...]}``: the next token of each of
this process's rows. A resumed iterator yields exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping, Protocol, Sequence

import grain
import numpy as np

from elastic_jax.data import DataError, tasks
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
    stage_tasks: for "tasks": the task settings of stage ``i`` are ``stage_tasks[min(i, len - 1)]`` (a stage's own
      ``tasks`` index overrides it); the default
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
  """A corpus as one endless sequence of documents."""

  def text(self, position: int) -> str:
    """The document at ``position`` (0, 1, 2, ...)."""


class TaskDocuments:
  """The synthetic training split: position ``g`` is training example ``g``."""

  def __init__(self, config: tasks.TaskConfig, seed: int):
    self.config, self.seed = config, seed

  def text(self, position: int) -> str:
    return tasks.generate_example(self.config, self.seed, "train", position).text


class FileDocuments:
  """A fixed list of documents, epoch after epoch, reshuffled each epoch: position ``g`` is document ``g mod N`` of
  epoch ``g div N``'s order."""

  def __init__(self, documents: Sequence[str], seed: int):
    if not documents:
      raise ValueError("a file corpus needs at least one document.")
    self.documents, self.seed = documents, seed
    self._order_epoch, self._order = None, None

  def epoch_order(self, epoch: int) -> grain.MapDataset:
    """Document indices in ``epoch``'s order."""
    if self._order_epoch != epoch:
      epoch_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
      self._order = grain.MapDataset.range(len(self.documents)).shuffle(seed=epoch_seed)
      self._order_epoch = epoch
    return self._order

  def text(self, position: int) -> str:
    epoch, index = divmod(position, len(self.documents))
    return self.documents[self.epoch_order(epoch)[index]]


class PackedBatches:
  """Iterator of int32 [len(rows), seq_len + 1] batches: ``rows`` of a global batch of ``batch_size`` rows, each
  packed from its own documents (see the module docstring); checkpointable.

  rows: the global row indices this iterator packs (default: all of them).
  """

  def __init__(self, documents: DocumentStream, tokenizer: Tokenizer, batch_size: int, seq_len: int,
               rows: Sequence[int] | None = None):
    self.documents, self.tokenizer = documents, tokenizer
    self.batch_size, self.seq_len = batch_size, seq_len
    self.rows = tuple(range(batch_size)) if rows is None else tuple(int(r) for r in rows)
    if not self.rows or not all(0 <= r < batch_size for r in self.rows):
      raise ValueError(f"rows {self.rows} must be a non-empty subset of the batch's rows [0, {batch_size}).")
    self.positions = [[0, 0] for _ in self.rows]  # per row: its next document (k-th of the row) and token offset
    self._cache: dict[int, tuple[int, list[int]]] = {}

  def __iter__(self) -> "PackedBatches":
    return self

  def _document_tokens(self, row: int, document: int) -> list[int]:
    cached = self._cache.get(row)
    if cached is None or cached[0] != document:
      text = self.documents.text(row + document * self.batch_size)
      cached = (document, self.tokenizer.encode(text) + [self.tokenizer.eos_id])
      self._cache[row] = cached
    return cached[1]

  def _next_row(self, i: int) -> list[int]:
    row, position = self.rows[i], self.positions[i]
    needed, out = self.seq_len + 1, []
    while len(out) < needed:
      tokens = self._document_tokens(row, position[0])
      piece = tokens[position[1]:position[1] + needed - len(out)]
      out.extend(piece)
      position[1] += len(piece)
      if position[1] == len(tokens):  # document finished: the row's next one
        position[0], position[1] = position[0] + 1, 0
    return out

  def __next__(self) -> np.ndarray:
    return np.asarray([self._next_row(i) for i in range(len(self.rows))], np.int32)

  def get_state(self) -> dict[str, Any]:
    return {"rows": [list(position) for position in self.positions]}

  def set_state(self, state: Mapping[str, Any]) -> None:
    rows = state.get("rows") if isinstance(state, Mapping) else None
    if not isinstance(rows, list) or len(rows) != len(self.rows) or not all(len(r) == 2 for r in rows):
      raise ValueError(f"data iterator state {dict(state) if isinstance(state, Mapping) else state!r} must be "
                       f"{{'rows': [[document, offset], ...]}} with one entry for each of this iterator's "
                       f"{len(self.rows)} rows; was it saved by a run with another batch size or process count?")
    self.positions = [[int(d), int(o)] for d, o in rows]


def load_documents(paths: Sequence[str | os.PathLike]) -> list[str]:
  """Documents from text and JSONL files (see :class:`SourceConfig`), in path order."""
  files = []
  for path in paths:
    path = os.fspath(path)
    if os.path.isdir(path):
      found = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(_TEXT_SUFFIXES))
      if not found:
        raise DataError(f"data directory {path} holds no {' or '.join(_TEXT_SUFFIXES)} files.")
      files.extend(found)
    elif os.path.isfile(path):
      files.append(path)
    else:
      raise FileNotFoundError(f"data path not found: {path}")
  documents = []
  for path in files:
    content = _read_text(path)
    if not content.strip():
      raise DataError(f"data file is empty: {path}")
    if path.endswith(".jsonl"):
      documents.extend(_jsonl_texts(path, content))
    else:
      documents.append(content)
  return documents


def _read_text(path: str) -> str:
  """The UTF-8 text of data file ``path``; a file that is not text is refused naming the first bad byte's offset."""
  with open(path, "rb") as file:
    data = file.read()
  try:
    content = data.decode("utf-8")
  except UnicodeDecodeError as error:
    raise DataError(f"data file {path} is not UTF-8 text: byte offset {error.start} (0x{data[error.start]:02x}) "
                    "starts no UTF-8 character; convert the file to UTF-8 or leave it out of data.paths.") from None
  nul = data.find(b"\x00")
  if nul >= 0:
    raise DataError(f"data file {path} holds a NUL byte at byte offset {nul}, which text does not; is it a binary "
                    "file? Leave it out of data.paths.")
  return content


def _jsonl_texts(path: str, content: str) -> list[str]:
  texts = []
  for number, line in enumerate(content.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise DataError(f"{path}:{number}: not valid JSON ({error.msg}).") from error
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
      raise DataError(f"{path}:{number}: expected a JSON object with a string 'text' field.")
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
    stage: anything with ``batch_size`` and ``seq_len`` (the loop's Stage); its ``tasks``, when it has one that is
      not None, picks the entry of ``stage_tasks`` it reads instead of its position's.
    stage_index: position of the stage in the curriculum; stages draw from different document orders.
    seed: the run's data seed.
    tokenizer: defaults to ``source_config.tokenizer`` (the byte tokenizer when that is empty).
    vocab_size: the model's vocabulary size; when given, a tokenizer that does not fit is refused.
    process_index, process_count: this process among ``process_count``; each packs its own block of the global
      batch's rows (and reads only their documents). None: ``jax.process_index()`` / ``jax.process_count()``.
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
    task_index = getattr(stage, "tasks", None)
    if task_index is None:
      task_index = min(stage_index, len(source_config.stage_tasks) - 1)
    elif not 0 <= task_index < len(source_config.stage_tasks):
      raise ValueError(f"stage tasks={task_index} is not an index of stage_tasks ({len(source_config.stage_tasks)} "
                       "entries).")
    task_config = source_config.stage_tasks[task_index]
    stream = TaskDocuments(task_config, stage_seed)
  else:
    if documents is None:
      documents = load_documents(source_config.paths)
    stream = FileDocuments(documents, stage_seed)
  local = stage.batch_size // process_count
  return PackedBatches(stream, tokenizer, stage.batch_size, stage.seq_len,
                       rows=range(process_index * local, (process_index + 1) * local))


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
