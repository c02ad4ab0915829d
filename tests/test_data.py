"""Data wing: task answers against independent checkers, split disjointness, exact packing, resume, sharding, errors."""

import dataclasses
import json
import types

import numpy as np
import pytest

from elastic_jax.data import pipeline, tasks
from elastic_jax.data.tokenizer import ByteTokenizer, HFTokenizer, check_vocab_fits, load_tokenizer

STAGE = types.SimpleNamespace(batch_size=3, seq_len=15)


def random_documents(count: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  alphabet = list("abcdefghij klmnop\nqrstuvwxyzé")
  return [f"doc{i}:" + "".join(rng.choice(alphabet, int(rng.integers(0, 40)))) for i in range(count)]


def packed_stream(iterator, batches: int) -> list[int]:
  return [int(t) for _ in range(batches) for t in next(iterator).reshape(-1)]


# ---------------------------------------------------------------------------------------------------------------
# tasks


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_every_answer_matches_the_independent_checker(family):
  for difficulty, distractors in [(1, 0), (2, 5), (4, 30)]:
    config = tasks.TaskConfig(families=(family,), difficulty=difficulty, distractors=distractors)
    for example in tasks.generate_examples(config, seed=7, split="train", count=150):
      assert example.family == family
      assert example.text.startswith(example.prompt) and example.prompt.endswith("\nA:")
      assert example.text.endswith("\n") and example.text.count(tasks.ANSWER_MARK) == 1
      assert tasks.extract_answer(example.text) == example.answer
      assert tasks.verify(example), example.text


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_checker_rejects_a_wrong_answer(family):
  example = tasks.generate_example(tasks.TaskConfig(families=(family,)), seed=0, split="train", index=3)
  wrong = str(int(example.answer) + 1)
  tampered = dataclasses.replace(example, solution=example.solution.replace(example.answer, wrong), answer=wrong)
  assert not tasks.verify(tampered)


def test_checkers_on_hand_worked_prompts():
  # 4821 + 397: columns 1+7=8, 2+9=11 (carry), 8+3+1=12 (carry), 4+0+1=5 -> 5218.
  assert tasks._check_arithmetic("Q: 4821+397=?\nA:") == "5218"
  assert tasks._check_arithmetic("Q: 1000-1=?\nA:") == "999"
  assert tasks._check_arithmetic("Q: note: lamp river 12\nnote: tiger stone 7\n58+64=?\nA:") == "122"
  # x: (3*5+2)%7 = 17%7 = 3, then (3*2+6)%7 = 12%7 = 5; the y update is a distractor.
  assert tasks._check_modular("Q: x=3; y=1; x=(x*5+2)%7; y=(y*2+1)%7; x=(x*2+6)%7. What is x?\nA:") == "5"
  assert tasks._check_variables("Q: Track the variables.\na=5\nnote: x\nb=a\na=7\nWhat is b?\nA:") == "5"


def test_arithmetic_distractors_are_notes_before_the_same_problem():
  short = tasks.generate_examples(tasks.TaskConfig(families=("arithmetic",)), seed=3, split="train", count=20)
  long = tasks.generate_examples(tasks.TaskConfig(families=("arithmetic",), distractors=6), seed=3, split="train",
                                 count=20)
  for example in long:
    lines = example.prompt.split("\n")
    assert len(lines) == 8 and all(line.startswith("note: ") for line in lines[1:6])
    assert lines[0].startswith("Q: note: ") and lines[-1] == "A:"
  # The problems themselves are drawn as without distractors (the notes come after them from the same stream), so
  # wherever both land in the same split the problem line and solution are the same.
  same = [(a, b) for a, b in zip(short, long) if a.prompt.split("\n")[0][3:] == b.prompt.split("\n")[-2]]
  assert len(same) >= 10 and all(a.solution == b.solution for a, b in same)


def test_examples_are_deterministic_and_seed_dependent():
  config = tasks.TaskConfig(distractors=3)
  first = tasks.generate_examples(config, seed=1, split="train", count=30)
  assert first == tasks.generate_examples(config, seed=1, split="train", count=30)
  other = tasks.generate_examples(config, seed=2, split="train", count=30)
  assert sum(a.prompt != b.prompt for a, b in zip(first, other)) > 20


def test_training_and_evaluation_splits_never_overlap():
  config = tasks.TaskConfig(difficulty=1)
  train = {e.prompt for e in tasks.generate_examples(config, seed=0, split="train", count=4000)}
  held_out = [e.prompt for e in tasks.generate_examples(config, seed=0, split="eval", count=1000)]
  assert len(train) > 3900 and len(set(held_out)) > 950
  assert not train & set(held_out)
  assert all(tasks.split_of_problem(e.problem) == "eval"
             for e in tasks.generate_examples(config, seed=0, split="eval", count=50))
  # The partition is by prompt text, so even another seed's training set stays out of the held-out set.
  other_train = {e.prompt for e in tasks.generate_examples(config, seed=5, split="train", count=2000)}
  assert not other_train & set(held_out)


def _problem_of_prompt(family: str, prompt: str) -> str:
  """The problem a prompt poses, its distractors removed, read off the prompt's text (not the generator's)."""
  body = prompt[len("Q: "):-len("\nA:")]
  if family == "arithmetic":  # the last line: "<a><op><b>=?"
    return body.split("\n")[-1].removesuffix("=?")
  if family == "modular":  # x's start and updates; the y lines are the distractors
    return "; ".join(s for s in body.removesuffix(". What is x?").split("; ") if s.startswith("x"))
  lines = body.split("\n")[1:]  # variables: the lines that write the core names, then the query
  return "\n".join(line for line in lines[:-1] if line[0] in "abcdefghijkm") + "\n" + lines[-1][len("What is "):]


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_a_held_out_problem_is_never_trained_on_behind_distractors(family):
  """The long-context evaluation set holds the short one's kind of problems behind distractor lines: none of its
  problems may reach training with other distractors (or none), and none of the short set's either."""
  short, long = (tasks.TaskConfig(families=(family,), distractors=d) for d in (0, 8))
  held_out = {_problem_of_prompt(family, e.prompt)
              for config, seed in ((short, 0), (long, 1)) for e in tasks.generate_examples(config, seed, "eval", 400)}
  trained = [_problem_of_prompt(family, e.prompt)
             for config in (short, long) for e in tasks.generate_examples(config, 0, "train", 3000)]
  assert not held_out & set(trained)
  # The check has power: the problem space is small enough that training problems repeat across distractor
  # counts, so a split by the whole prompt would let held-out problems through.
  if family == "arithmetic":
    assert len(set(trained[:3000]) & set(trained[3000:])) > 100
  generated = tasks.generate_examples(long, 1, "eval", 20)
  assert all(e.problem == _problem_of_prompt(family, e.prompt) for e in generated)


def test_extract_answer_and_score():
  assert tasks.extract_answer(" 1+2+0=3 c0; so 3 #### 3\nQ: next") == "3"
  assert tasks.extract_answer("no answer here") is None
  assert tasks.extract_answer("#### -12") == "-12"
  examples = tasks.generate_examples(tasks.TaskConfig(), seed=0, split="eval", count=4)
  generations = [examples[0].solution, "#### nonsense", examples[2].solution, ""]
  assert tasks.score(examples, generations) == 0.5


def test_bad_task_config_is_refused():
  with pytest.raises(ValueError, match="must be a non-empty subset"):
    tasks.TaskConfig(families=("poetry",))
  with pytest.raises(ValueError, match="difficulty=0 must be >= 1"):
    tasks.TaskConfig(difficulty=0)


# ---------------------------------------------------------------------------------------------------------------
# tokenizers


def test_byte_tokenizer_round_trip_and_reserved_nul():
  tokenizer = ByteTokenizer()
  text = "Q: 12+34=?\nA: é #### 46\n"
  assert tokenizer.encode(text) == list(text.encode("utf-8"))
  assert tokenizer.decode(tokenizer.encode(text) + [tokenizer.eos_id, 65]) == text
  with pytest.raises(ValueError, match="NUL byte"):
    tokenizer.encode("a\x00b")
  check_vocab_fits(tokenizer, 256)
  assert isinstance(load_tokenizer(None), ByteTokenizer)
  # A model with a vocabulary padded past the bytes can emit ids the tokenizer lacks: shown as U+FFFD, not an error.
  assert tokenizer.decode([104, 300, 105, 256]) == "h\ufffdi\ufffd"


def write_word_tokenizer(path, num_words: int) -> str:
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(num_words)}}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  file = str(path / "tokenizer.json")
  tokenizer.save(file)
  return file


def test_hf_tokenizer_loads_and_packs_with_its_eos(tmp_path):
  tokenizer = load_tokenizer(write_word_tokenizer(tmp_path, 10))
  assert isinstance(tokenizer, HFTokenizer) and tokenizer.vocab_size == 12 and tokenizer.eos_id == 0
  assert tokenizer.encode("w0 w3 zz") == [2, 5, 1]
  documents = ["w1 w2", "w3", "w4 w5 w6"]
  stream = pipeline.FileDocuments(documents, seed=0)
  iterator = pipeline.PackedBatches(stream, tokenizer, batch_size=1, seq_len=6)
  order = [stream.text(i) for i in range(3)]  # one row: every position in turn
  expected = [t for doc in order for t in tokenizer.encode(doc) + [0]]
  assert packed_stream(iterator, 1) == expected[:7]


def test_vocab_mismatch_is_refused_with_both_sizes(tmp_path):
  tokenizer = load_tokenizer(write_word_tokenizer(tmp_path, 298))
  with pytest.raises(ValueError, match=r"tokenizer has 300 tokens but model vocab_size=256"):
    check_vocab_fits(tokenizer, 256)
  with pytest.raises(ValueError, match=r"tokenizer has 300 tokens but model vocab_size=256"):
    pipeline.data_factory(pipeline.SourceConfig(), seed=0, tokenizer=tokenizer, vocab_size=256)


def test_missing_tokenizer_file(tmp_path):
  pytest.importorskip("tokenizers")
  with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
    load_tokenizer(tmp_path / "absent.json")


def test_source_config_tokenizer_feeds_the_factory(tmp_path):
  tokenizer_file = write_word_tokenizer(tmp_path, 10)  # ids: <|endoftext|> 0, [UNK] 1, w<i> i + 2
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text(json.dumps({"text": "w1 w2"}) + "\n")
  stage = types.SimpleNamespace(batch_size=1, seq_len=5)
  # A file path or the directory holding tokenizer.json; the default end-of-document token, or a named one.
  for tokenizer, eos_token, eos_id in ((tokenizer_file, "", 0), (str(tmp_path), "[UNK]", 1)):
    source = pipeline.SourceConfig.from_dict({"kind": "files", "paths": [str(corpus)], "tokenizer": tokenizer,
                                              "eos_token": eos_token})
    batch = next(pipeline.data_factory(source, seed=0, vocab_size=12)(stage, 0))
    np.testing.assert_array_equal(batch, [[3, 4, eos_id, 3, 4, eos_id]])  # one document, twice (two epochs)


def test_source_config_tokenizer_errors_name_the_value(tmp_path):
  tokenizer_file = write_word_tokenizer(tmp_path, 10)
  source = pipeline.SourceConfig(tokenizer=tokenizer_file)
  with pytest.raises(ValueError, match=rf"tokenizer has 12 tokens but model vocab_size=8 \({tokenizer_file}\)"):
    pipeline.data_factory(source, seed=0, vocab_size=8)
  with pytest.raises(FileNotFoundError, match=f"tokenizer file not found: {tmp_path / 'absent.json'}"):
    pipeline.data_factory(pipeline.SourceConfig(tokenizer=str(tmp_path / "absent.json")), seed=0)
  with pytest.raises(ValueError, match=r"tokenizer .* has none of the end-of-document tokens \['<eos>'\]"):
    pipeline.data_factory(pipeline.SourceConfig(tokenizer=tokenizer_file, eos_token="<eos>"), seed=0)
  with pytest.raises(ValueError, match="data.tokenizer=3 must be a string"):
    pipeline.SourceConfig(tokenizer=3)
  # The byte default refuses a vocabulary smaller than 256 and says which tokenizer it is.
  with pytest.raises(ValueError, match=r"tokenizer has 256 tokens but model vocab_size=100 \(byte tokenizer"):
    pipeline.data_factory(pipeline.SourceConfig(), seed=0, vocab_size=100)


# ---------------------------------------------------------------------------------------------------------------
# packing, resume, sharding


def _row_tokens(stream, row: int, rows: int, documents: int) -> list[int]:
  """Row ``row`` of ``rows``: its documents (positions row, row + rows, ...) as bytes, each followed by id 0."""
  return [t for k in range(documents) for t in list(stream.text(row + k * rows).encode("utf-8")) + [0]]


def test_packing_keeps_every_token_exactly_once_per_epoch():
  documents = random_documents(37)
  tokenizer = ByteTokenizer()
  stream = pipeline.FileDocuments(documents, seed=3)
  n = len(documents)
  epoch_orders = [[stream.text(epoch * n + i) for i in range(n)] for epoch in range(3)]
  for order in epoch_orders:
    assert sorted(order) == sorted(documents)  # each epoch is a permutation of the corpus
  assert epoch_orders[0] != epoch_orders[1]  # reshuffled every epoch
  # Row r packs positions r, r + B, ...: the rows together read every position once, so every token of an epoch
  # exactly once; each row's tokens run on, unpadded, across documents and epochs.
  rows = STAGE.batch_size
  batches = 3 * sum(len(d.encode("utf-8")) + 1 for d in documents) // (rows * (STAGE.seq_len + 1))  # > 2 epochs
  iterator = pipeline.PackedBatches(stream, tokenizer, rows, STAGE.seq_len)
  got = np.stack([next(iterator) for _ in range(batches)], axis=1).reshape(rows, -1)  # [rows, batches * (l + 1)]
  for row in range(rows):
    expected = _row_tokens(stream, row, rows, 3 * n // rows + 2)
    assert got[row].tolist() == expected[:got.shape[1]]
  assert min(document for document, _ in iterator.get_state()["rows"]) * rows >= 2 * n  # into the third epoch


def test_task_stream_packs_the_generated_texts_in_order():
  config = tasks.TaskConfig(distractors=2)
  stream = pipeline.TaskDocuments(config, seed=11)
  iterator = pipeline.PackedBatches(stream, ByteTokenizer(), 2, 63)
  got = np.stack([next(iterator) for _ in range(6)], axis=1).reshape(2, -1)
  texts = [e.text for e in tasks.generate_examples(config, seed=11, split="train", count=200)]
  assert [stream.text(i) for i in range(200)] == texts
  for row in range(2):  # row r: examples r, r + 2, r + 4, ...
    expected = [t for text in texts[row::2] for t in list(text.encode("utf-8")) + [0]]
    assert got[row].tolist() == expected[:got.shape[1]]


@pytest.mark.parametrize("kind", ["tasks", "files"])
def test_iterator_resumes_at_the_same_position(kind, tmp_path):
  if kind == "files":
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": doc}) for doc in random_documents(11)) + "\n")
    config = pipeline.SourceConfig(kind="files", paths=(str(path),))
  else:
    config = pipeline.SourceConfig()
  make_data = pipeline.data_factory(config, seed=5, vocab_size=256)
  for stage_index in (0, 1):
    iterator = make_data(STAGE, stage_index)
    for _ in range(7):
      batch = next(iterator)
      assert batch.shape == (STAGE.batch_size, STAGE.seq_len + 1) and batch.dtype == np.int32
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    after = [next(iterator) for _ in range(9)]
    resumed = make_data(STAGE, stage_index)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack([next(resumed) for _ in range(9)]), np.stack(after))
    fresh = make_data(STAGE, stage_index)  # same seed and stage: same stream from the start
    np.testing.assert_array_equal(next(fresh), next(make_data(STAGE, stage_index)))
  assert not np.array_equal(next(make_data(STAGE, 0)), next(make_data(STAGE, 1)))


@pytest.mark.parametrize("kind", ["tasks", "files"])
def test_the_global_batch_is_the_same_for_any_process_count(kind, tmp_path):
  if kind == "files":
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": doc}) for doc in random_documents(5)) + "\n")  # fewer than rows
    source = pipeline.SourceConfig(kind="files", paths=(str(path),))
  else:
    source = pipeline.SourceConfig()
  stage = types.SimpleNamespace(batch_size=12, seq_len=15)
  single = pipeline.make_stage_data(source, stage, 0, seed=4, process_index=0, process_count=1)
  reference = [next(single) for _ in range(5)]
  for count in (2, 3, 4):
    shares = [pipeline.make_stage_data(source, stage, 0, seed=4, process_index=p, process_count=count)
              for p in range(count)]
    for step in range(5):
      # Process p packs rows [p B/P, (p + 1) B/P) of the very batch one process packs alone.
      np.testing.assert_array_equal(np.concatenate([next(share) for share in shares]), reference[step])
    # Each process resumes its own rows from its own state.
    states = [json.loads(json.dumps(share.get_state())) for share in shares]
    resumed = pipeline.make_stage_data(source, stage, 0, seed=4, process_index=count - 1, process_count=count)
    resumed.set_state(states[-1])
    np.testing.assert_array_equal(next(resumed), next(shares[-1]))
  # A process reads only its own rows' documents: positions r, r + B, ... of its rows r.
  task_share = pipeline.make_stage_data(pipeline.SourceConfig(), stage, 0, seed=4, process_index=1, process_count=3)
  read = []
  original = task_share.documents.text
  task_share.documents.text = lambda position: read.append(position) or original(position)
  next(task_share)
  assert read and all(position % 12 in (4, 5, 6, 7) for position in read)


def test_a_stage_reads_the_task_settings_it_names():
  source = pipeline.SourceConfig(stage_tasks=(tasks.TaskConfig(families=("arithmetic",)),
                                              tasks.TaskConfig(families=("arithmetic",), distractors=8)))
  shape = types.SimpleNamespace(batch_size=2, seq_len=512)
  def notes(stage, index):
    return ByteTokenizer().decode(next(pipeline.make_stage_data(source, stage, index, seed=0))[0]).count("note: ")
  # By position: stage 0 the short settings, stage 1 and later stages the last (long) ones.
  assert notes(shape, 0) == 0 and notes(shape, 1) > 0 and notes(shape, 2) > 0
  # A stage that names entry 0 reads the short settings wherever it stands, from its own position's stream.
  named = types.SimpleNamespace(batch_size=2, seq_len=512, tasks=0)
  assert notes(named, 2) == 0
  assert not np.array_equal(next(pipeline.make_stage_data(source, named, 2, seed=0)),
                            next(pipeline.make_stage_data(source, shape, 0, seed=0)))
  with pytest.raises(ValueError, match=r"stage tasks=2 is not an index of stage_tasks \(2 entries\)"):
    pipeline.make_stage_data(source, types.SimpleNamespace(batch_size=2, seq_len=8, tasks=2), 0, seed=0)


def test_bad_sources_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="data path not found: .*missing.txt"):
    pipeline.data_factory({"kind": "files", "paths": [str(tmp_path / "missing.txt")]}, seed=0)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n  \n")
  with pytest.raises(ValueError, match="data file is empty: .*empty.jsonl"):
    pipeline.load_documents([empty])
  no_text = tmp_path / "no_text.jsonl"
  no_text.write_text('{"text": "fine"}\n{"body": "x"}\n')
  with pytest.raises(ValueError, match=r"no_text.jsonl:2: expected a JSON object with a string 'text' field"):
    pipeline.load_documents([no_text])
  with pytest.raises(ValueError, match="needs at least one path"):
    pipeline.SourceConfig(kind="files")
  with pytest.raises(ValueError, match="kind 'web' must be one of"):
    pipeline.SourceConfig(kind="web")
  with pytest.raises(ValueError, match="needs at least one document"):
    pipeline.FileDocuments([], seed=0)
  with pytest.raises(ValueError, match=r"rows \(0, 3\) must be a non-empty subset of the batch's rows \[0, 3\)"):
    pipeline.PackedBatches(pipeline.TaskDocuments(tasks.TaskConfig(), 0), ByteTokenizer(), 3, 4, rows=[0, 3])
  with pytest.raises(ValueError, match=r"state \{'epoch': 0\} must be \{'rows': \[\[document, offset\], \.\.\.\]\}"):
    pipeline.make_stage_data(pipeline.SourceConfig(), STAGE, 0, seed=0).set_state({"epoch": 0})


def test_text_files_and_directories(tmp_path):
  (tmp_path / "b.txt").write_text("second file")
  (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
  (tmp_path / "ignored.bin").write_text("x")
  assert pipeline.load_documents([tmp_path]) == ["one", "two", "second file"]


def test_source_config_from_plain_values():
  config = pipeline.SourceConfig.from_dict(
      {"kind": "tasks", "stage_tasks": [{"families": ["modular"], "difficulty": 3, "distractors": 10}]})
  assert config.stage_tasks == (tasks.TaskConfig(families=("modular",), difficulty=3, distractors=10),)
  text = pipeline.make_stage_data(config, STAGE, 4, seed=0)  # later stages reuse the last entry
  assert ByteTokenizer().decode(next(text)[0]).startswith("Q: x=")


def test_factory_accepts_the_loops_stage():
  from elastic_jax.train.loop import Stage  # pylint: disable=import-outside-toplevel
  stage = Stage(name="short", steps=2, batch_size=2, seq_len=32, budget_probs=(1.0,))
  batch = next(pipeline.data_factory(pipeline.SourceConfig(), seed=0, vocab_size=256)(stage, 0))
  assert batch.shape == (2, 33) and batch.dtype == np.int32 and batch.max() < 256
