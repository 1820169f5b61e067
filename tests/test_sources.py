"""Tests of training-file reading, ArrayRecord shards and the default corpus."""

import json
import os
import pickle

import ml_collections
import numpy as np
import pyarrow
import pyarrow.parquet
import pytest

from mtl_lm import tokenizer as tokenizer_lib
from mtl_lm.data import default_corpus
from mtl_lm.data import sentences
from mtl_lm.data import sources


def _data_config(train_files="", **overrides):
  config = ml_collections.ConfigDict({
      "train_files": train_files, "train_weights": "", "jsonl_field": "text",
      "tokenizer": "", "vocab_size": 300, "max_bad_fraction": 0.01,
      "shuffle_seed": 0})
  config.update(overrides)
  return config


def _write_jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write((record if isinstance(record, str) else json.dumps(record)) +
              "\n")
  return str(path)


def _texts(dataset):
  return [element["text"] for element in dataset]


@pytest.fixture(scope="module")
def tokenizer():
  texts = ["The cat sat on the mat. It was happy! Was it? Yes.",
           "猫坐在垫子上。它很高兴！是吗？是的。"] * 50
  return tokenizer_lib.train_tokenizer(texts, vocab_size=300, num_threads=1)


# ---------------------------------------------------------------------------
# Text formats.


def test_txt_documents_between_blank_lines(tmp_path):
  path = tmp_path / "a.txt"
  # A BOM, CRLF line ends, a whitespace-only separator line, two blank lines.
  path.write_bytes("\ufeffFirst line\r\nsecond line\r\n\r\n"
                   "Second doc\n   \n\nThird\n  indented\n".encode("utf-8"))
  dataset = sources.load_documents(_data_config(str(path)))
  assert _texts(dataset) == ["First line\nsecond line", "Second doc",
                             "Third\n  indented"]
  assert [e["source"] for e in dataset] == [
      f"{path}:1", f"{path}:4", f"{path}:7"]


def test_jsonl_documents_and_field(tmp_path):
  path = _write_jsonl(tmp_path / "a.jsonl", [
      {"body": "one", "text": "ignored"}, {"body": "two\nlines"}])
  dataset = sources.load_documents(_data_config(path, jsonl_field="body"))
  assert _texts(dataset) == ["one", "two\nlines"]
  assert [e["source"] for e in dataset] == [f"{path}:1", f"{path}:2"]


def test_jsonl_bad_records_skipped_and_counted(tmp_path):
  records = [{"text": f"good {i}"} for i in range(6)]
  records[1:1] = ["{not json", "[1, 2]", json.dumps({"title": "no text"}),
                  json.dumps({"text": 7})]
  records.append("")  # Blank lines are not records.
  path = _write_jsonl(tmp_path / "a.jsonl", records)
  documents, stats = sources.read_text_file(path, max_bad_fraction=0.5)
  assert [d["text"] for d in documents] == [f"good {i}" for i in range(6)]
  assert documents[1]["source"] == f"{path}:6"
  assert stats.records == 10
  assert stats.skipped == 4
  assert stats.bad_fraction == pytest.approx(0.4)


def test_jsonl_too_many_bad_records_raise(tmp_path):
  path = _write_jsonl(tmp_path / "a.jsonl", ['{"text": "ok"}', "oops"])
  with pytest.raises(ValueError, match="max_bad_fraction") as error:
    sources.load_documents(_data_config(path))
  message = str(error.value)
  assert path in message
  assert "1 of 2 records" in message
  assert "0.5000" in message


def test_empty_documents_skipped_not_bad(tmp_path):
  path = _write_jsonl(tmp_path / "a.jsonl",
                      [{"text": ""}, {"text": " \n "}, {"text": "real"}])
  documents, stats = sources.read_text_file(path, max_bad_fraction=0.0)
  assert [d["text"] for d in documents] == ["real"]
  assert stats.empty == 2
  assert stats.bad == 0


def test_invalid_utf8_replaced_and_counted(tmp_path):
  path = tmp_path / "a.txt"
  path.write_bytes(b"caf\xe9 au lait\n\n" + b"fine\n\n" * 3)
  documents, stats = sources.read_text_file(str(path), max_bad_fraction=0.5)
  assert documents[0]["text"] == "caf\ufffd au lait"
  assert stats.invalid_utf8 == 1
  assert stats.documents == 4
  with pytest.raises(ValueError, match="1 with invalid UTF-8"):
    sources.read_text_file(str(path), max_bad_fraction=0.1)


def test_invalid_utf8_inside_jsonl_string(tmp_path):
  path = tmp_path / "a.jsonl"
  path.write_bytes(b'{"text": "bad \xff byte"}\n{"text": "good"}\n'
                   b'{"text": "lone \\ud800 escape"}\n')
  documents, stats = sources.read_text_file(str(path), max_bad_fraction=1.0)
  assert [d["text"] for d in documents] == [
      "bad \ufffd byte", "good", "lone \ufffd escape"]
  assert stats.invalid_utf8 == 2


def test_bad_records_logged_rate_limited(tmp_path, monkeypatch):
  warnings = []
  monkeypatch.setattr(sources.logging, "warning",
                      lambda *args: warnings.append(args))
  path = _write_jsonl(tmp_path / "a.jsonl", ["oops"] * 25 + ['{"text": "ok"}'])
  sources.read_text_file(path, max_bad_fraction=1.0)
  # The first 10 problems, with file and line, then one summary.
  assert len(warnings) == 11
  assert warnings[0][1] == f"{path}:1"
  assert "25 problems" in warnings[-1][0] % warnings[-1][1:]


def test_utf16_file_raises(tmp_path):
  path = tmp_path / "wide.txt"
  path.write_bytes("Some text.".encode("utf-16"))
  with pytest.raises(ValueError, match="UTF-16.*must be UTF-8"):
    sources.load_documents(_data_config(str(path)))


def test_nul_bytes_skip_document(tmp_path):
  path = tmp_path / "a.txt"
  path.write_bytes(b"text\x00with nul\n\nclean text")
  documents, stats = sources.read_text_file(str(path), max_bad_fraction=0.5)
  assert [d["text"] for d in documents] == ["clean text"]
  assert stats.skipped == 1


def test_binary_junk_txt_raises(tmp_path):
  path = tmp_path / "junk.txt"
  path.write_bytes(bytes(np.random.default_rng(0).integers(
      128, 256, size=4096, dtype=np.uint8)))
  with pytest.raises(ValueError, match="junk.txt: 1 of 1 records are bad"):
    sources.load_documents(_data_config(str(path)))


def test_empty_file_skipped(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  (tmp_path / "blank.jsonl").write_text("\n\n")
  (tmp_path / "full.txt").write_text("Some text.")
  dataset = sources.load_documents(_data_config(str(tmp_path / "*")))
  assert _texts(dataset) == ["Some text."]


def test_no_usable_documents_raise(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  (tmp_path / "blank.txt").write_text("\n  \n")
  with pytest.raises(ValueError, match="No usable documents") as error:
    sources.load_documents(_data_config(str(tmp_path / "*.txt")))
  assert "blank.txt" in str(error.value)
  assert "empty.txt" in str(error.value)


def test_parquet_documents(tmp_path):
  path = str(tmp_path / "a.parquet")
  table = pyarrow.table({"text": ["first", None, "third"], "id": [1, 2, 3]})
  pyarrow.parquet.write_table(table, path)
  documents, stats = sources.read_text_file(path, max_bad_fraction=0.5)
  assert [d["text"] for d in documents] == ["first", "third"]
  assert [d["source"] for d in documents] == [f"{path}#0", f"{path}#2"]
  assert stats.skipped == 1


def test_parquet_missing_or_wrong_column_raises(tmp_path):
  path = str(tmp_path / "a.parquet")
  pyarrow.parquet.write_table(pyarrow.table({"id": [1, 2]}), path)
  with pytest.raises(ValueError, match="no column 'text'.*'id'"):
    sources.load_documents(_data_config(path))
  with pytest.raises(ValueError, match="type int64, not string"):
    sources.load_documents(_data_config(path, jsonl_field="id"))


def test_corrupt_parquet_raises(tmp_path):
  path = tmp_path / "bad.parquet"
  path.write_bytes(b"PAR1 this is not parquet")
  with pytest.raises(ValueError, match="Could not read .* as Parquet"):
    sources.load_documents(_data_config(str(path)))


def test_changed_file_is_reread(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("old")
  assert _texts(sources.load_documents(_data_config(str(path)))) == ["old"]
  path.write_text("new")  # Same size, so only the mtime differs.
  os.utime(path, ns=(1, 10**18))  # Bump the mtime, whatever the clock.
  assert _texts(sources.load_documents(_data_config(str(path)))) == ["new"]


# ---------------------------------------------------------------------------
# Globs, directories and weights.


def test_glob_without_match_raises(tmp_path):
  pattern = str(tmp_path / "missing*.txt")
  with pytest.raises(ValueError, match="matches no file") as error:
    sources.resolve_train_files(_data_config(f"{pattern}"))
  assert pattern in str(error.value)


def test_unknown_extension_raises(tmp_path):
  (tmp_path / "notes.md").write_text("hello")
  with pytest.raises(ValueError, match="'.md'.*only .txt, .jsonl"):
    sources.resolve_train_files(_data_config(str(tmp_path / "notes.md")))


def test_directory_reads_supported_files(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "b.txt").write_text("from b")
  (tmp_path / "sub" / "a.jsonl").write_text('{"text": "from a"}\n')
  (tmp_path / "README.md").write_text("ignored")
  (tmp_path / ".hidden.txt").write_text("ignored")
  resolved = sources.resolve_train_files(_data_config(str(tmp_path)))
  assert resolved == [(str(tmp_path), [str(tmp_path / "b.txt"),
                                       str(tmp_path / "sub" / "a.jsonl")])]
  assert _texts(sources.load_documents(_data_config(str(tmp_path)))) == [
      "from b", "from a"]


def test_directory_of_junk_raises(tmp_path):
  (tmp_path / "blob.bin").write_bytes(b"\x00\x01" * 100)
  with pytest.raises(ValueError, match="no .txt/.jsonl.*'.bin'"):
    sources.resolve_train_files(_data_config(str(tmp_path)))


def test_home_is_expanded(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  (tmp_path / "a.txt").write_text("hi")
  resolved = sources.resolve_train_files(_data_config("~/*.txt"))
  assert resolved == [("~/*.txt", [str(tmp_path / "a.txt")])]


def test_weights_default_to_document_counts(tmp_path):
  (tmp_path / "a.txt").write_text("1\n\n2\n\n3")
  (tmp_path / "b.txt").write_text("only")
  loaded = sources.load_sources(
      _data_config(f"{tmp_path}/a.txt, {tmp_path}/b.txt"))
  assert [name for name, _, _ in loaded] == [f"{tmp_path}/a.txt",
                                             f"{tmp_path}/b.txt"]
  assert [len(dataset) for _, dataset, _ in loaded] == [3, 1]
  assert [weight for _, _, weight in loaded] == pytest.approx([0.75, 0.25])


def test_explicit_weights_are_normalized(tmp_path):
  (tmp_path / "a.txt").write_text("1\n\n2\n\n3")
  (tmp_path / "b.txt").write_text("only")
  loaded = sources.load_sources(_data_config(
      f"{tmp_path}/a.txt,{tmp_path}/b.txt", train_weights="1, 3"))
  assert [weight for _, _, weight in loaded] == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize("weights, message", [
    ("1", "has 1 weights but train_files has 2 globs"),
    ("1,-2", "positive finite"),
    ("1,nan", "positive finite"),
    ("1,x", "not a comma-separated list of numbers"),
])
def test_invalid_weights_raise(tmp_path, weights, message):
  (tmp_path / "a.txt").write_text("a")
  with pytest.raises(ValueError, match=message):
    sources.load_sources(_data_config(f"{tmp_path}/a.txt,{tmp_path}/a.txt",
                                      train_weights=weights))


def test_load_documents_concatenates_sources(tmp_path):
  (tmp_path / "a.txt").write_text("a1\n\na2")
  _write_jsonl(tmp_path / "b.jsonl", [{"text": "b1"}])
  dataset = sources.load_documents(
      _data_config(f"{tmp_path}/a.txt,{tmp_path}/b.jsonl"))
  assert _texts(dataset) == ["a1", "a2", "b1"]
  assert _texts(pickle.loads(pickle.dumps(dataset))) == ["a1", "a2", "b1"]


def test_sample_texts_is_seeded_and_capped(tmp_path):
  documents = [{"text": f"doc{i:02d}", "source": ""} for i in range(50)]
  first = list(sources.sample_texts(documents, max_chars=20, seed=1))
  again = list(sources.sample_texts(documents, max_chars=20, seed=1))
  other = list(sources.sample_texts(documents, max_chars=1000, seed=2))
  assert first == again
  assert len(first) == 4  # 5 characters each; stops once 20 are reached.
  assert sorted(other) == sorted(d["text"] for d in documents)
  assert other[:4] != first


# ---------------------------------------------------------------------------
# ArrayRecord shards.


def test_record_round_trip():
  data = sources.encode_record(np.array([7, 8, 9]), np.array([2, 3]),
                               tokenizer_fingerprint="0123456789abcdef",
                               source="a.txt:3")
  record = sources.decode_record(data)
  np.testing.assert_array_equal(record["ids"], [7, 8, 9])
  np.testing.assert_array_equal(record["sentence_ends"], [2, 3])
  assert record["ids"].dtype == np.int32
  assert record["source"] == "a.txt:3"
  assert record["tokenizer_fingerprint"] == "0123456789abcdef"


@pytest.mark.parametrize("data, message", [
    (b"short", "too short"),
    (b"XXXX" + bytes(40), "not an mtl_lm record"),
])
def test_invalid_record_raises(data, message):
  with pytest.raises(ValueError, match=message):
    sources.decode_record(data, where="f#0")


def test_truncated_record_raises():
  data = sources.encode_record(np.arange(10), np.array([10]),
                               tokenizer_fingerprint="0" * 16, source="")
  with pytest.raises(ValueError, match="truncated"):
    sources.decode_record(data[:-8])


def test_array_record_round_trip(tmp_path, tokenizer):
  texts = ["The cat sat. It was happy!", "猫坐在垫子上。是吗？", "   ",
           "Yes. Was it?"]
  corpus = _write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
  documents = sources.load_documents(_data_config(corpus))
  output_dir = str(tmp_path / "shards")
  paths = sources.write_array_record_shards(documents, tokenizer,
                                            output_dir=output_dir,
                                            num_shards=2)
  assert [os.path.basename(p) for p in paths] == [
      "train-00000-of-00002.array_record", "train-00001-of-00002.array_record"]
  assert os.path.exists(os.path.join(output_dir, "tokenizer.model"))

  config = _data_config(f"{output_dir}/*.array_record")
  shards = sources.load_documents(config)
  # The whitespace-only document was dropped as empty while reading.
  assert len(shards) == 3
  for element, text in zip(shards, [texts[0], texts[1], texts[3]]):
    expected = sentences.tokenize_document(tokenizer, text)
    np.testing.assert_array_equal(element["ids"], expected["ids"])
    np.testing.assert_array_equal(element["sentence_ends"],
                                  expected["sentence_ends"])
  assert shards[0]["source"] == f"{corpus}:1"
  assert shards[2]["source"] == f"{corpus}:4"

  restored = pickle.loads(pickle.dumps(shards))
  np.testing.assert_array_equal(restored[2]["ids"], shards[2]["ids"])
  tokenized = sources.tokenize_element(tokenizer, shards[1])
  assert sorted(tokenized) == ["ids", "sentence_ends", "source"]
  sources.check_shard_tokenizer(config, tokenizer)


def test_shards_refuse_existing_output(tmp_path, tokenizer):
  corpus = _write_jsonl(tmp_path / "a.jsonl", [{"text": "The cat."}])
  documents = sources.load_documents(_data_config(corpus))
  output_dir = str(tmp_path / "shards")
  sources.write_array_record_shards(documents, tokenizer,
                                    output_dir=output_dir, num_shards=1)
  with pytest.raises(ValueError, match="already contains 1 .array_record"):
    sources.write_array_record_shards(documents, tokenizer,
                                      output_dir=output_dir, num_shards=1)
  with pytest.raises(ValueError, match="num_shards=2 must be between 1"):
    sources.write_array_record_shards(documents, tokenizer,
                                      output_dir=str(tmp_path / "other"),
                                      num_shards=2)


def test_shards_with_other_tokenizer_raise(tmp_path, tokenizer):
  corpus = _write_jsonl(tmp_path / "a.jsonl", [{"text": "The cat."}])
  output_dir = str(tmp_path / "shards")
  sources.write_array_record_shards(
      sources.load_documents(_data_config(corpus)), tokenizer,
      output_dir=output_dir, num_shards=1)
  other = tokenizer_lib.train_tokenizer(["Other text, other pieces. "] * 40,
                                        vocab_size=280, num_threads=1)
  config = _data_config(output_dir)
  with pytest.raises(ValueError, match="fingerprint"):
    sources.check_shard_tokenizer(config, other)
  with pytest.raises(ValueError, match="saved next to the shards"):
    sources.tokenize_element(other, sources.load_documents(config)[0])
  # Training a new tokenizer cannot help: the shards' ids are fixed.
  with pytest.raises(ValueError, match="Cannot train a tokenizer"):
    tokenizer_lib.load_or_train_tokenizer(config, str(tmp_path / "run"))


def test_junk_array_record_raises(tmp_path):
  path = tmp_path / "junk.array_record"
  path.write_bytes(b"junk" * 100)
  with pytest.raises(ValueError, match="not a readable ArrayRecord file"):
    sources.load_documents(_data_config(str(path)))


# ---------------------------------------------------------------------------
# Default corpus.


@pytest.fixture(scope="module")
def default_corpus_cache(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("cache"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv(default_corpus.CACHE_ENV_VAR, cache)
    yield cache


def test_default_corpus_builds_once(default_corpus_cache):
  path = default_corpus.default_corpus_path()
  assert os.path.dirname(path) == default_corpus_cache
  assert os.path.getsize(path) > 1_000_000
  modified = os.stat(path).st_mtime_ns
  assert default_corpus.default_corpus_path() == path
  assert os.stat(path).st_mtime_ns == modified

  with open(path, encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  origins = {record["origin"] for record in records}
  assert "json.dumps" in origins
  assert any(origin.startswith("topic:") for origin in origins)
  texts = [record["text"] for record in records]
  assert len(set(texts)) == len(texts)
  assert min(len(text) for text in texts) >= 40


def test_empty_train_files_use_default_corpus(default_corpus_cache):
  del default_corpus_cache  # Only needed for the environment variable.
  loaded = sources.load_sources(_data_config(""))
  assert len(loaded) == 1
  name, dataset, weight = loaded[0]
  assert name == "cpython_docs"
  assert weight == 1.0
  assert len(dataset) > 3000
  assert dataset[0]["source"].endswith(".jsonl:1")
