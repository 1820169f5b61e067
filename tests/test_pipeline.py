"""Tests of the Grain training pipeline in mtl_lm.data.pipeline."""

import collections
import json

import grain
import jax
import numpy as np
import pytest

from configs import base
from mtl_lm import tasks
from mtl_lm import tokenizer as tokenizer_lib
from mtl_lm.data import corruptions
from mtl_lm.data import pipeline
from mtl_lm.data import sentences

_ENGLISH_WORDS = (
    "river stone garden lantern winter harbor pepper violin marble candle "
    "meadow thunder copper orchard silver whistle ladder feather saddle "
    "pocket").split()
_CHINESE_DOCUMENTS = (
    "宝玉走进园子。黛玉正在窗下读书！她问：“你从哪里来？”宝玉笑着不答。",
    "天色渐晚，众人散去。湘云还在亭中作诗。探春说：“明日再来罢！”",
    "雪下了一夜。早上园中一片白色？丫头们都出来看雪。",
)
_SEQ_LEN = 32


def _english_document(index: int) -> str:
  rng = np.random.default_rng(index)
  parts = []
  for _ in range(int(rng.integers(2, 7))):
    words = rng.choice(_ENGLISH_WORDS, int(rng.integers(3, 9)))
    parts.append(" ".join(words).capitalize() +
                 str(rng.choice([".", "!", "?"])))
  return " ".join(parts)


def _documents():
  texts = [_english_document(i) for i in range(30)]
  texts += list(_CHINESE_DOCUMENTS)
  texts.append("Alone.")  # One sentence: too short for sop.
  return [{"text": text, "source": f"fixture:{i}"}
          for i, text in enumerate(texts)]


@pytest.fixture(scope="module")
def tokenizer():
  texts = [document["text"] for document in _documents()] * 4
  return tokenizer_lib.train_tokenizer(texts, vocab_size=700, num_threads=1)


@pytest.fixture(scope="module")
def documents():
  return grain.MapDataset.source(_documents())


def _config(**rates):
  config = base.get_config()
  config.data.seq_len = _SEQ_LEN
  config.data.batch_size = 8
  config.data.task_rates = rates or {"lm": 0.4, "mlm": 0.2, "rtd": 0.2,
                                     "sop": 0.2}
  return config


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _segments(row):
  """Yields (start, end) of each packed document of a row."""
  segment_ids = row["segment_ids"]
  for segment in range(1, int(segment_ids.max()) + 1):
    positions = np.flatnonzero(segment_ids == segment)
    yield positions[0], positions[-1] + 1


# Task shares.


def test_task_batch_sizes_hand_checked():
  rates = {"lm": 0.4, "mlm": 0.2, "rtd": 0.2, "sop": 0.2}
  assert pipeline.task_batch_sizes(rates, 16) == {
      "lm": 7, "mlm": 3, "rtd": 3, "sop": 3}
  assert pipeline.task_batch_sizes(rates, 10) == {
      "lm": 4, "mlm": 2, "rtd": 2, "sop": 2}
  # 1.2, 0.6, 0.6, 0.6: the two left-over rows go to the first ties.
  assert pipeline.task_batch_sizes(rates, 3) == {
      "lm": 1, "mlm": 1, "rtd": 1, "sop": 0}
  assert pipeline.task_batch_sizes({"lm": 1.0}, 5) == {
      "lm": 5, "mlm": 0, "rtd": 0, "sop": 0}


def test_task_batch_sizes_sum_and_rounding():
  rng = np.random.default_rng(0)
  for _ in range(100):
    rates = dict(zip(tasks.TASK_NAMES, rng.random(4)))
    batch_size = int(rng.integers(1, 100))
    sizes = pipeline.task_batch_sizes(rates, batch_size)
    assert sum(sizes.values()) == batch_size
    total = sum(rates.values())
    for name in tasks.TASK_NAMES:
      assert abs(sizes[name] - rates[name] / total * batch_size) < 1


def test_batches_have_exact_task_shares(tokenizer, documents):
  config = _config()
  iterator = pipeline.make_train_iterator(
      config, tokenizer, process_index=0, process_count=1, documents=documents)
  for batch in _take(iterator, 6):
    counts = collections.Counter(batch["task_id"].tolist())
    assert counts == {0: 3, 1: 2, 2: 2, 3: 1}


def test_batch_keys_shapes_and_dtypes(tokenizer, documents):
  config = _config()
  batch = next(pipeline.make_train_iterator(
      config, tokenizer, process_index=0, process_count=1,
      documents=documents))
  assert set(batch) == set(pipeline.BATCH_KEYS)
  for key in ("input_ids", "original_ids", "targets", "segment_ids",
              "positions"):
    assert batch[key].shape == (8, _SEQ_LEN), key
    assert batch[key].dtype == np.int32, key
  assert batch["loss_weights"].dtype == np.float32
  assert batch["task_id"].shape == batch["sop_label"].shape == (8,)


def test_rate_zero_task_is_not_built(tokenizer):
  # These documents have no sop example, which raises only if sop is built.
  one_sentence = grain.MapDataset.source(
      [{"text": "Only one sentence here.", "source": "a"}])
  config = _config(lm=1.0, mlm=0.0, rtd=0.0, sop=0.0)
  batch = next(pipeline.make_train_iterator(
      config, tokenizer, process_index=0, process_count=1,
      documents=one_sentence))
  np.testing.assert_array_equal(batch["task_id"], 0)


# Packing and per-task contents.


def test_packed_rows_keep_documents_separable(tokenizer, documents):
  config = _config()
  iterator = pipeline.make_train_iterator(
      config, tokenizer, process_index=0, process_count=1, documents=documents)
  for batch in _take(iterator, 4):
    for row in range(8):
      row_data = {key: batch[key][row] for key in pipeline.BATCH_KEYS}
      segment_ids = row_data["segment_ids"]
      real = segment_ids > 0
      # Padding only at the end, segments numbered 1, 2, ... in order.
      assert np.all(np.diff(real.astype(int)) <= 0)
      assert np.all(np.diff(segment_ids[real]) >= 0)
      np.testing.assert_array_equal(row_data["input_ids"][~real],
                                    tokenizer_lib.PAD_ID)
      np.testing.assert_array_equal(row_data["loss_weights"][~real], 0)
      for start, end in _segments(row_data):
        np.testing.assert_array_equal(row_data["positions"][start:end],
                                      np.arange(end - start))


def test_lm_rows_targets_are_next_tokens(tokenizer, documents):
  config = _config(lm=1.0)
  batch = next(pipeline.make_train_iterator(
      config, tokenizer, process_index=0, process_count=1,
      documents=documents))
  for row in range(8):
    row_data = {key: batch[key][row] for key in pipeline.BATCH_KEYS}
    for start, end in _segments(row_data):
      inputs = row_data["input_ids"][start:end]
      targets = row_data["targets"][start:end]
      np.testing.assert_array_equal(targets[:-1], inputs[1:])
      np.testing.assert_array_equal(row_data["loss_weights"][start:end], 1)
    np.testing.assert_array_equal(row_data["original_ids"],
                                  row_data["input_ids"])


def test_lm_pieces_are_slices_of_their_document(tokenizer, documents):
  config = _config(lm=1.0)
  rows = iter(pipeline.make_example_dataset(
      config, tokenizer, process_index=0, process_count=1,
      documents=documents))
  expected = {}
  for document in _documents():
    ids = sentences.tokenize_document(tokenizer, document["text"])["ids"]
    expected[document["source"]] = np.concatenate(
        [[tokenizer_lib.BOS_ID], ids, [tokenizer_lib.EOS_ID]])
  num_pieces = 0
  for _ in range(24):
    row = next(rows)
    for (start, end), source in zip(_segments(row), row["sources"]):
      # inputs + the last target == tokens[offset:offset + length + 1].
      piece = np.append(row["input_ids"][start:end], row["targets"][end - 1])
      tokens = expected[source]
      windows = np.lib.stride_tricks.sliding_window_view(tokens, len(piece))
      assert np.any(np.all(windows == piece, axis=1)), (source, piece)
      num_pieces += 1
  assert num_pieces > 24


def test_mlm_and_rtd_rows(tokenizer, documents):
  config = _config(mlm=0.5, rtd=0.5)
  iterator = pipeline.make_train_iterator(
      config, tokenizer, process_index=0, process_count=1, documents=documents)
  for batch in _take(iterator, 4):
    special = batch["original_ids"] < tokenizer_lib.NUM_RESERVED_IDS
    mlm = batch["task_id"] == tasks.TASK_IDS["mlm"]
    rtd = batch["task_id"] == tasks.TASK_IDS["rtd"]
    assert not np.any(batch["loss_weights"][special])
    np.testing.assert_array_equal(batch["targets"][mlm],
                                  batch["original_ids"][mlm])
    changed = batch["input_ids"] != batch["original_ids"]
    assert not np.any(changed[mlm] & (batch["loss_weights"][mlm] == 0))
    np.testing.assert_array_equal(batch["targets"][rtd],
                                  changed[rtd].astype(np.int32))
    np.testing.assert_array_equal(batch["loss_weights"][rtd],
                                  (~special[rtd]).astype(np.float32))
    for row in np.flatnonzero(mlm | rtd):
      for start, end in _segments({"segment_ids": batch["segment_ids"][row]}):
        assert batch["original_ids"][row, start] == tokenizer_lib.BOS_ID
        assert batch["original_ids"][row, end - 1] == tokenizer_lib.EOS_ID


def test_rtd_generator_rows_carry_mask(tokenizer, documents):
  config = _config(rtd=1.0)
  config.rtd.replacements = "generator"
  batch = next(pipeline.make_train_iterator(
      config, tokenizer, process_index=0, process_count=1,
      documents=documents))
  masked = batch["input_ids"] == tokenizer_lib.MASK_ID
  assert np.any(masked)
  np.testing.assert_array_equal(batch["targets"], 0)
  np.testing.assert_array_equal(batch["input_ids"][~masked],
                                batch["original_ids"][~masked])


def test_whole_word_variant_runs(tokenizer, documents):
  config = _config(mlm=1.0)
  config.data.mlm_variant = "whole_word"
  batch = next(pipeline.make_train_iterator(
      config, tokenizer, process_index=0, process_count=1,
      documents=documents))
  selected = batch["loss_weights"] > 0
  assert np.any(selected)
  assert np.all(batch["original_ids"][selected] >=
                tokenizer_lib.NUM_RESERVED_IDS)


def test_sop_rows(tokenizer, documents):
  config = _config(sop=1.0)
  rows = iter(pipeline.make_example_dataset(
      config, tokenizer, process_index=0, process_count=1,
      documents=documents))
  by_source = {d["source"]: d["text"] for d in _documents()}
  for _ in range(40):
    row = next(rows)
    assert row["task"] == "sop"
    assert set(np.unique(row["segment_ids"]).tolist()) <= {0, 1}
    assert row["sources"] != ["fixture:33"]  # The one-sentence document.
    permutation = row["sop_permutation"]
    assert row["sop_label"] == corruptions.permutation_rank(permutation)
    segments = [row["input_ids"][start:end]
                for start, end in row["sop_segment_spans"]]
    in_order = [segments[i] for i in np.argsort(permutation)]
    # Undoing the permutation gives original_ids.
    expected_original = np.concatenate(
        [[tokenizer_lib.BOS_ID], in_order[0], [tokenizer_lib.SEP_ID],
         in_order[1], [tokenizer_lib.EOS_ID]])
    real = row["segment_ids"] > 0
    np.testing.assert_array_equal(row["original_ids"][real], expected_original)
    # No segment starts with whitespace, which would reveal its position.
    for segment in segments:
      assert tokenizer.decode(segment[:1]).strip(), segment
    # The segments are consecutive text of the document, minus the
    # whitespace before each segment.
    text = by_source[row["sources"][0]]
    restored = tokenizer.decode(np.concatenate(in_order))
    assert "".join(restored.split()) in "".join(text.split())


def test_sop_chinese_segments_end_at_sentence_ends(tokenizer, documents):
  config = _config(sop=1.0)
  rows = iter(pipeline.make_example_dataset(
      config, tokenizer, process_index=0, process_count=1,
      documents=documents))
  num_chinese = 0
  for _ in range(60):
    row = pipeline.describe_example(next(rows), tokenizer)
    if row["sources"][0] not in ("fixture:30", "fixture:31", "fixture:32"):
      continue
    num_chinese += 1
    for text in row["sop_segment_texts"]:
      assert text.rstrip("”」』）").endswith(("。", "！", "？")), text
  assert num_chinese > 0


def test_sop_short_documents_counted(tokenizer):
  tokenized = pipeline.tokenize_documents(
      grain.MapDataset.source(_documents()), tokenizer)
  summary = pipeline.summarize_sop_documents(tokenized, seq_len=_SEQ_LEN,
                                             num_segments=2)
  assert summary["documents"] == 34
  assert summary["short_documents"] == 1
  assert summary["examples"] > 30
  summary3 = pipeline.summarize_sop_documents(tokenized, seq_len=_SEQ_LEN,
                                              num_segments=3)
  num_short = sum(
      len(sentences.split_sentences(d["text"])) < 3 for d in _documents())
  assert summary3["short_documents"] == num_short


def test_sop_without_examples_raises(tokenizer):
  config = _config(sop=1.0)
  one_sentence = grain.MapDataset.source(
      [{"text": "Only one sentence here.", "source": "a"}])
  with pytest.raises(ValueError, match="sop has no examples"):
    pipeline.make_train_dataset(config, tokenizer, process_index=0,
                                process_count=1, documents=one_sentence)


def test_pretokenized_documents_skip_tokenizer(tokenizer):
  config = _config(lm=1.0)
  config.data.batch_size = 1
  ids = np.arange(10, 20, dtype=np.int32)
  documents = grain.MapDataset.source(
      [{"ids": ids, "sentence_ends": np.array([4, 10]), "source": "p",
        "tokenizer_fingerprint": tokenizer.fingerprint}])
  batch = next(pipeline.make_train_iterator(
      config, tokenizer, process_index=0, process_count=1,
      documents=documents))
  np.testing.assert_array_equal(
      batch["input_ids"][0, :11],
      np.concatenate([[tokenizer_lib.BOS_ID], ids]))


# Determinism, resume and sharding.


def test_same_config_same_batches(tokenizer, documents):
  config = _config()
  first = _take(pipeline.make_train_iterator(
      config, tokenizer, process_index=0, process_count=1,
      documents=documents), 3)
  second = _take(pipeline.make_train_iterator(
      config, tokenizer, process_index=0, process_count=1,
      documents=documents), 3)
  np.testing.assert_equal(first, second)
  config.data.shuffle_seed = 1
  third = _take(pipeline.make_train_iterator(
      config, tokenizer, process_index=0, process_count=1,
      documents=documents), 3)
  assert not np.array_equal(first[0]["input_ids"], third[0]["input_ids"])


def test_resume_at_every_state(tokenizer, documents):
  config = _config()
  dataset = pipeline.make_train_dataset(config, tokenizer, process_index=0,
                                        process_count=1, documents=documents)
  grain.experimental.assert_equal_output_after_checkpoint(
      grain.experimental.LimitIterDataset(dataset, count=4))


def test_resume_from_json_state(tokenizer, documents):
  config = _config()
  iterator = pipeline.make_train_iterator(
      config, tokenizer, process_index=0, process_count=1, documents=documents)
  _take(iterator, 5)  # Save a state past the start.
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 3)
  restored = pipeline.make_train_iterator(
      config, tokenizer, process_index=0, process_count=1, documents=documents)
  restored.set_state(state)
  np.testing.assert_equal(_take(restored, 3), expected)


def test_processes_read_disjoint_documents(tokenizer, documents):
  config = _config()
  seen = []
  for process_index in range(2):
    config.data.batch_size = 8
    rows = iter(pipeline.make_example_dataset(
        config, tokenizer, process_index=process_index, process_count=2,
        documents=documents))
    sources = set()
    for _ in range(40):
      sources.update(next(rows)["sources"])
    seen.append(sources)
    indices = {int(s.split(":")[1]) for s in sources}
    assert all(i % 2 == process_index for i in indices), indices
  assert not seen[0] & seen[1]


def test_per_process_batch_size(tokenizer, documents):
  config = _config()
  batch = next(pipeline.make_train_iterator(
      config, tokenizer, process_index=1, process_count=2,
      documents=documents))
  assert batch["input_ids"].shape == (4, _SEQ_LEN)
  # 0.4, 0.2, 0.2, 0.2 of 4 rows: 1.6, 0.8, 0.8, 0.8 round to 1 each.
  assert collections.Counter(batch["task_id"].tolist()) == {
      0: 1, 1: 1, 2: 1, 3: 1}


def test_example_rows_match_train_batches(tokenizer, documents):
  config = _config()
  batch = next(pipeline.make_train_iterator(
      config, tokenizer, process_index=0, process_count=1,
      documents=documents))
  rows = _take(iter(pipeline.make_example_dataset(
      config, tokenizer, process_index=0, process_count=1,
      documents=documents)), 8)
  for index, row in enumerate(rows):
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(row[key], batch[key][index], err_msg=key)
    assert tasks.TASK_IDS[row["task"]] == batch["task_id"][index]
    assert len(row["sources"]) == row["segment_ids"].max()


# Validation.


@pytest.mark.parametrize("field,value,message", [
    ("task_rates", {"lm": 0.0}, "are all zero"),
    ("task_rates", {"lm": 1.0, "nsp": 1.0}, "unknown tasks"),
    ("task_rates", {"lm": -1.0}, "task_rates.lm=-1.0"),
    ("batch_size", 7, "batch_size=7 must be a positive multiple"),
    ("mask_rate", 1.5, "mask_rate=1.5"),
    ("mlm_variant", "bogus", "mlm_variant='bogus'"),
    ("sop_num_segments", 1, "sop_num_segments=1"),
    ("seq_len", 4, "seq_len=4 is too short"),
])
def test_invalid_config_raises(field, value, message):
  config = _config()
  config.data[field] = value
  with pytest.raises(ValueError, match=message):
    pipeline.validate_data_config(config, process_count=2)


def test_invalid_rtd_replacements_raises():
  config = _config()
  config.rtd.replacements = "bert"
  with pytest.raises(ValueError, match="replacements='bert'"):
    pipeline.validate_data_config(config, process_count=1)


# Global batches and inspection.


def test_make_global_batch_single_process():
  mesh = jax.make_mesh((1, 1), ("data", "fsdp"),
                       devices=jax.devices()[:1])
  local = {"input_ids": np.arange(8, dtype=np.int32).reshape(2, 4),
           "task_id": np.array([0, 3], np.int32)}
  global_batch = pipeline.make_global_batch(local, mesh)
  np.testing.assert_array_equal(np.asarray(global_batch["input_ids"]),
                                local["input_ids"])
  np.testing.assert_array_equal(np.asarray(global_batch["task_id"]), [0, 3])
  assert global_batch["input_ids"].sharding.spec == jax.sharding.PartitionSpec(
      ("data", "fsdp"))


def test_write_examples(tokenizer, documents, tmp_path):
  config = _config()
  output = tmp_path / "examples.jsonl"
  written = pipeline.write_examples(config, tokenizer, num_examples=12,
                                    output_path=str(output),
                                    documents=documents)
  lines = [json.loads(line) for line in output.read_text().splitlines()]
  assert written == len(lines) == 12
  required = {"task", "input_ids", "original_ids", "targets", "loss_weights",
              "segment_ids", "positions", "text", "original_text", "sources"}
  for line in lines:
    assert required <= set(line), set(line)
    assert len(line["input_ids"]) == _SEQ_LEN
  sop_lines = [line for line in lines if line["task"] == "sop"]
  assert sop_lines
  for line in sop_lines:
    assert len(line["sop_segment_texts"]) == 2
    assert line["text"].startswith("<s>")
    assert line["text"].count("<sep>") == 1
    for text in line["sop_segment_texts"]:
      assert text in line["text"]
  mlm_lines = [line for line in lines if line["task"] == "mlm"]
  assert any("<mask>" in line["text"] for line in mlm_lines)


def test_sources_mixed_by_train_weights(tokenizer, tmp_path):
  for name in ("a", "b"):
    paragraphs = [_english_document(i) for i in range(10)]
    (tmp_path / f"{name}.txt").write_text("\n\n".join(paragraphs))
  config = _config(lm=1.0)
  config.data.train_files = f"{tmp_path}/a.txt,{tmp_path}/b.txt"
  config.data.train_weights = "3,1"
  rows = iter(pipeline.make_example_dataset(
      config, tokenizer, process_index=0, process_count=1))
  counts = collections.Counter()
  for _ in range(60):
    for source in next(rows)["sources"]:
      counts[source.split("/")[-1].split(".")[0]] += 1
  share = counts["a"] / (counts["a"] + counts["b"])
  assert abs(share - 0.75) < 0.08, counts
