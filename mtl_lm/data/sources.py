"""Training documents from text files, Parquet, ArrayRecord or CPython's docs.

`config.data.train_files` is a comma-separated list of globs (`~` expanded,
`**` recursive). A glob that matches a directory reads every file with a
supported extension below it, skipping hidden names and other extensions. An
explicitly matched file must have one of these extensions:

  .txt           Documents separated by blank lines; newlines inside a
                 document are kept. Source: "path:first line".
  .jsonl         One JSON object per line, text in `config.data.jsonl_field`.
                 Source: "path:line".
  .parquet       One document per row, text in the `jsonl_field` column.
                 Source: "path#row".
  .array_record  Pre-tokenized documents written by launch/prepare_data.py
                 (see `encode_record`). Source: "path#record".

An empty `train_files` reads CPython's documentation (`default_corpus`).

.txt, .jsonl and .parquet files are read into memory once per process and
yield elements `{"text": str, "source": str}`. ArrayRecord files are read
lazily and yield `{"ids": int32 [n], "sentence_ends": int32 [m], "source":
str, "tokenizer_fingerprint": str}`, which need no tokenization.
`tokenize_element` turns either kind into `{"ids", "sentence_ends",
"source"}` and checks that shards were written with the given tokenizer.

Bad input is skipped or repaired, counted and logged (the first
`_MAX_LOGGED_PROBLEMS` per file, then a summary): invalid UTF-8 is replaced by
U+FFFD, and JSONL lines that are not JSON objects with a string field are
skipped. Both count as bad records, and a file with more than
`config.data.max_bad_fraction` bad records raises a ValueError. Empty files
and empty documents are skipped and counted but are not bad.
"""

import collections
import dataclasses
import functools
import glob
import json
import math
import os
import re
import struct
import time
from typing import Any, Iterator, Sequence

from absl import logging
import grain
import numpy as np

from mtl_lm.data import default_corpus
from mtl_lm.data import sentences

EXTENSIONS = (".txt", ".jsonl", ".parquet", ".array_record")

_MAX_LOGGED_PROBLEMS = 10
# Lone surrogates: `errors="surrogateescape"` turns invalid UTF-8 bytes into
# them, and JSON escapes such as "\ud800" produce them. Valid UTF-8 never
# decodes to them, and the tokenizer cannot encode them.
_LONE_SURROGATES = re.compile("[\ud800-\udfff]+")


@dataclasses.dataclass
class FileStats:
  """Counts from reading one file."""
  path: str
  records: int = 0  # Documents, JSONL lines or rows seen (blank lines aside).
  documents: int = 0  # Usable documents kept.
  characters: int = 0  # Characters in the kept documents.
  empty: int = 0  # Empty documents skipped.
  invalid_utf8: int = 0  # Kept with U+FFFD in place of invalid bytes.
  skipped: int = 0  # Records dropped as unusable (not JSON, no text field...).

  @property
  def bad(self) -> int:
    return self.invalid_utf8 + self.skipped

  @property
  def bad_fraction(self) -> float:
    return self.bad / self.records if self.records else 0.0


class _ProblemLog:
  """Logs the first few problems of a file, then only counts them."""

  def __init__(self, path: str):
    self.path = path
    self.count = 0

  def report(self, where: str, problem: str) -> None:
    self.count += 1
    if self.count <= _MAX_LOGGED_PROBLEMS:
      logging.warning("%s: %s", where, problem)

  def summarize(self) -> None:
    if self.count > _MAX_LOGGED_PROBLEMS:
      logging.warning("%s: %d problems in all; only the first %d were logged.",
                      self.path, self.count, _MAX_LOGGED_PROBLEMS)


# ---------------------------------------------------------------------------
# Globs, directories and weights.


def _split_list(value: str) -> list[str]:
  return [item.strip() for item in str(value).split(",") if item.strip()]


def _extension(path: str) -> str:
  return os.path.splitext(path)[1].lower()


def _files_in_directory(directory: str) -> list[str]:
  """Supported files below `directory`, sorted; hidden names are skipped."""
  found = []
  ignored = collections.Counter()
  for root, dirnames, filenames in os.walk(directory):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for filename in sorted(filenames):
      if filename.startswith("."):
        continue
      if _extension(filename) in EXTENSIONS:
        found.append(os.path.join(root, filename))
      else:
        ignored[_extension(filename) or "(none)"] += 1
  if ignored:
    logging.info("Ignoring %d files in %s with unsupported extensions %s.",
                 sum(ignored.values()), directory, dict(ignored))
  if not found:
    raise ValueError(
        f"Directory {directory!r} contains no {'/'.join(EXTENSIONS)} files "
        f"(found extensions: {dict(ignored) or 'none'}). Point "
        f"--config.data.train_files at files in a supported format.")
  return found


def resolve_train_files(data_config) -> list[tuple[str, list[str]]]:
  """Expands `data_config.train_files` without reading any file.

  Args:
    data_config: the `config.data` ConfigDict.

  Returns:
    One `(glob, sorted file paths)` pair per comma-separated glob; [] when
    train_files is empty (the default corpus).

  Raises:
    ValueError: if a glob matches nothing, a matched file has an unsupported
      extension, or a matched directory contains no supported file.
  """
  resolved = []
  for pattern in _split_list(data_config.train_files):
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not matches:
      raise ValueError(
          f"--config.data.train_files glob {pattern!r} matches no file "
          f"(working directory {os.getcwd()!r}). Fix the path, or pass an "
          f"empty train_files to train on CPython's documentation.")
    paths = []
    for match in matches:
      if os.path.isdir(match):
        paths.extend(_files_in_directory(match))
      elif _extension(match) in EXTENSIONS:
        paths.append(match)
      else:
        raise ValueError(
            f"File {match!r} (from glob {pattern!r}) has extension "
            f"{_extension(match) or '(none)'!r}, but only "
            f"{', '.join(EXTENSIONS)} are supported. Convert or rename it, or "
            f"narrow the glob in --config.data.train_files.")
    resolved.append((pattern, paths))
  return resolved


def parse_train_weights(data_config, num_sources: int) -> list[float] | None:
  """Parses `data_config.train_weights`; None means by number of documents.

  Raises:
    ValueError: if the count differs from the number of globs or a weight is
      not a positive finite number.
  """
  text = str(data_config.get("train_weights", "") or "")
  if not text.strip():
    return None
  items = _split_list(text)
  try:
    weights = [float(item) for item in items]
  except ValueError:
    raise ValueError(
        f"--config.data.train_weights={text!r} is not a comma-separated list "
        f"of numbers.") from None
  if len(weights) != num_sources:
    raise ValueError(
        f"--config.data.train_weights={text!r} has {len(weights)} weights but "
        f"train_files has {num_sources} globs. Give one weight per glob, or "
        f"leave train_weights empty to weight globs by their document counts.")
  if not all(math.isfinite(w) and w > 0 for w in weights):
    raise ValueError(
        f"--config.data.train_weights={text!r} must contain positive finite "
        f"numbers; drop a glob from train_files to leave it out.")
  return weights


# ---------------------------------------------------------------------------
# Text formats.


class _TextDocuments(Sequence[dict[str, str]]):
  """Documents of one file in memory, with their source locations."""

  def __init__(self, path: str, texts: list[str], locations: Sequence[int],
               separator: str):
    self._path = path
    self._texts = texts
    self._locations = np.asarray(locations, dtype=np.int64)
    self._separator = separator

  def __len__(self) -> int:
    return len(self._texts)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    return {
        "text": self._texts[index],
        "source": f"{self._path}{self._separator}{self._locations[index]}",
    }


def _decode(data: bytes, path: str) -> str:
  """Decodes UTF-8 (BOM dropped), escaping invalid bytes as lone surrogates."""
  if data.startswith((b"\xff\xfe", b"\xfe\xff")):
    raise ValueError(
        f"{path!r} starts with a UTF-16 byte order mark; training files must "
        f"be UTF-8. Convert it, e.g. with `iconv -f UTF-16 -t UTF-8`.")
  if data.startswith(b"\xef\xbb\xbf"):
    data = data[3:]
  text = data.decode("utf-8", errors="surrogateescape")
  return text.replace("\r\n", "\n")


def _repair(text: str) -> tuple[str, bool]:
  """Replaces lone surrogates by U+FFFD and reports whether there were any."""
  if _LONE_SURROGATES.search(text) is None:
    return text, False
  return _LONE_SURROGATES.sub("\ufffd", text), True


def _read_txt(path: str, stats: FileStats,
              problems: _ProblemLog) -> tuple[list[str], list[int]]:
  with open(path, "rb") as f:
    lines = _decode(f.read(), path).split("\n")
  texts, first_lines = [], []
  paragraph, first_line = [], 0

  def flush():
    if not paragraph:
      return
    stats.records += 1
    text, repaired = _repair("\n".join(paragraph))
    if "\0" in text:
      # NUL is valid UTF-8 but hardly ever part of text: binary or UTF-16.
      stats.skipped += 1
      problems.report(f"{path}:{first_line}",
                      "skipped: contains NUL bytes (binary data?)")
      return
    if repaired:
      stats.invalid_utf8 += 1
      problems.report(f"{path}:{first_line}",
                      "invalid UTF-8 replaced by U+FFFD")
    texts.append(text)
    first_lines.append(first_line)

  for number, line in enumerate(lines, start=1):
    if line.strip():
      if not paragraph:
        first_line = number
      paragraph.append(line)
    else:
      flush()
      paragraph = []
  flush()
  return texts, first_lines


def _parse_jsonl_line(line: str, field: str) -> tuple[str | None, str]:
  """Returns (text, problem); text is None when the record is unusable."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    return None, f"not valid JSON ({e.msg} at column {e.colno})"
  if not isinstance(record, dict):
    return None, f"a JSON {type(record).__name__}, not an object"
  if field not in record:
    keys = sorted(record)[:8]
    return None, (f"no field {field!r} (fields: {keys}); set "
                  f"--config.data.jsonl_field")
  value = record[field]
  if not isinstance(value, str):
    return None, f"field {field!r} is a {type(value).__name__}, not a string"
  return value, ""


def _read_jsonl(path: str, field: str, stats: FileStats,
                problems: _ProblemLog) -> tuple[list[str], list[int]]:
  with open(path, "rb") as f:
    lines = _decode(f.read(), path).split("\n")
  texts, line_numbers = [], []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    stats.records += 1
    text, problem = _parse_jsonl_line(line, field)
    if text is None:
      stats.skipped += 1
      problems.report(f"{path}:{number}", f"skipped: {problem}")
      continue
    # Invalid bytes and surrogate escapes survive json.loads as surrogates.
    text, repaired = _repair(text)
    if repaired:
      stats.invalid_utf8 += 1
      problems.report(f"{path}:{number}", "invalid UTF-8 replaced by U+FFFD")
    texts.append(text)
    line_numbers.append(number)
  return texts, line_numbers


def _read_parquet(path: str, field: str, stats: FileStats,
                  problems: _ProblemLog) -> tuple[list[str], list[int]]:
  import pyarrow  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet  # pylint: disable=g-import-not-at-top

  try:
    parquet_file = pyarrow.parquet.ParquetFile(path)
    schema = parquet_file.schema_arrow
    if field not in schema.names:
      raise ValueError(
          f"Parquet file {path!r} has no column {field!r} (columns: "
          f"{schema.names[:20]}). Set --config.data.jsonl_field to the text "
          f"column.")
    column_type = schema.field(field).type
    if not (pyarrow.types.is_string(column_type) or
            pyarrow.types.is_large_string(column_type)):
      raise ValueError(
          f"Column {field!r} of Parquet file {path!r} has type {column_type}, "
          f"not string. Set --config.data.jsonl_field to a text column.")
    values = parquet_file.read(columns=[field]).column(field).to_pylist()
  except (pyarrow.ArrowException, OSError) as e:
    raise ValueError(
        f"Could not read {path!r} as Parquet: {e}. Check that the file is a "
        f"complete Parquet file, or remove it from --config.data.train_files."
    ) from e

  texts, rows = [], []
  for row, value in enumerate(values):
    stats.records += 1
    if value is None:
      stats.skipped += 1
      problems.report(f"{path}#{row}", f"skipped: {field!r} is null")
      continue
    texts.append(value)
    rows.append(row)
  return texts, rows


def _check_bad_fraction(stats: FileStats, max_bad_fraction: float) -> None:
  if stats.bad_fraction > max_bad_fraction:
    raise ValueError(
        f"{stats.path}: {stats.bad} of {stats.records} records are bad "
        f"({stats.invalid_utf8} with invalid UTF-8, {stats.skipped} skipped as "
        f"unusable), a fraction of {stats.bad_fraction:.4f}, above "
        f"--config.data.max_bad_fraction={max_bad_fraction}. Check the "
        f"file's format and encoding (the first problems are logged above), "
        f"or raise --config.data.max_bad_fraction.")


@functools.lru_cache(maxsize=64)
def _read_text_file_cached(path: str, size: int, mtime_ns: int, field: str,
                           max_bad_fraction: float):
  del size, mtime_ns  # Part of the cache key only: a changed file is reread.
  stats = FileStats(path)
  problems = _ProblemLog(path)
  extension = _extension(path)
  if extension == ".txt":
    texts, locations = _read_txt(path, stats, problems)
  elif extension == ".jsonl":
    texts, locations = _read_jsonl(path, field, stats, problems)
  else:
    texts, locations = _read_parquet(path, field, stats, problems)
  problems.summarize()

  kept_texts, kept_locations = [], []
  for text, location in zip(texts, locations):
    if text.strip():
      kept_texts.append(text)
      kept_locations.append(location)
    else:
      stats.empty += 1
  stats.documents = len(kept_texts)
  stats.characters = sum(len(text) for text in kept_texts)
  _check_bad_fraction(stats, max_bad_fraction)
  separator = "#" if extension == ".parquet" else ":"
  return _TextDocuments(path, kept_texts, kept_locations, separator), stats


def read_text_file(path: str, *, field: str = "text",
                   max_bad_fraction: float = 0.01
                   ) -> tuple[Sequence[dict[str, str]], FileStats]:
  """Reads the documents of one .txt, .jsonl or .parquet file into memory.

  Results are cached per process, keyed by path, size and modification time.

  Args:
    path: the file.
    field: JSONL field or Parquet column that contains the text.
    max_bad_fraction: raise if more than this fraction of records is bad.

  Returns:
    A sequence of `{"text", "source"}` dicts, and the file's `FileStats`.

  Raises:
    ValueError: for an unreadable file or too many bad records.
  """
  if _extension(path) not in (".txt", ".jsonl", ".parquet"):
    raise ValueError(f"{path!r} is not a .txt, .jsonl or .parquet file.")
  try:
    info = os.stat(path)
    return _read_text_file_cached(path, info.st_size, info.st_mtime_ns, field,
                                  float(max_bad_fraction))
  except OSError as e:
    raise ValueError(f"Cannot read training file {path!r}: {e}.") from e


# ---------------------------------------------------------------------------
# Pre-tokenized ArrayRecord shards.

# Little-endian header: magic, format version, 3 padding bytes, tokenizer
# fingerprint (16 ASCII hex digits), number of ids, number of sentence ends.
# Then int32 ids, int32 sentence ends, and the UTF-8 source location.
_RECORD_MAGIC = b"MTLD"
_RECORD_VERSION = 1
_RECORD_HEADER = struct.Struct("<4sB3x16sII")


def encode_record(ids: np.ndarray, sentence_ends: np.ndarray, *,
                  tokenizer_fingerprint: str, source: str) -> bytes:
  """Serializes one tokenized document for an ArrayRecord shard.

  Args:
    ids: int `[num_tokens]`, below 2**31.
    sentence_ends: int `[num_sentences]`, exclusive ends, strictly
      increasing, the last equal to num_tokens.
    tokenizer_fingerprint: `Tokenizer.fingerprint` of the tokenizer used.
    source: where the document came from, e.g. "corpus.jsonl:12".

  Returns:
    The record bytes; `decode_record` reads them back.
  """
  ids = np.asarray(ids, dtype="<i4").reshape(-1)
  sentence_ends = np.asarray(sentence_ends, dtype="<i4").reshape(-1)
  fingerprint = tokenizer_fingerprint.encode("ascii")
  if len(fingerprint) != 16:
    raise ValueError(
        f"tokenizer_fingerprint={tokenizer_fingerprint!r} must be 16 "
        f"characters, as Tokenizer.fingerprint is.")
  header = _RECORD_HEADER.pack(_RECORD_MAGIC, _RECORD_VERSION, fingerprint,
                               ids.size, sentence_ends.size)
  return (header + ids.tobytes() + sentence_ends.tobytes() +
          source.encode("utf-8"))


def decode_record(data: bytes, *, where: str = "record") -> dict[str, Any]:
  """Parses bytes written by `encode_record`.

  Args:
    data: one record.
    where: its location, used in error messages.

  Returns:
    `{"ids": int32 [n], "sentence_ends": int32 [m], "source": str,
    "tokenizer_fingerprint": str}`.

  Raises:
    ValueError: if the bytes are not such a record.
  """
  if len(data) < _RECORD_HEADER.size:
    raise ValueError(f"{where}: {len(data)} bytes is too short for an mtl_lm "
                     f"record; write shards with launch/prepare_data.py.")
  magic, version, fingerprint, num_ids, num_ends = _RECORD_HEADER.unpack_from(
      data)
  if magic != _RECORD_MAGIC or version != _RECORD_VERSION:
    raise ValueError(
        f"{where}: not an mtl_lm record of version {_RECORD_VERSION} (magic "
        f"{magic!r}, version {version}); write shards with "
        f"launch/prepare_data.py.")
  ids_end = _RECORD_HEADER.size + 4 * num_ids
  ends_end = ids_end + 4 * num_ends
  if len(data) < ends_end:
    raise ValueError(f"{where}: record is truncated ({len(data)} bytes, "
                     f"header announces {ends_end}).")
  ids = np.frombuffer(data, dtype="<i4", count=num_ids,
                      offset=_RECORD_HEADER.size)
  sentence_ends = np.frombuffer(data, dtype="<i4", count=num_ends,
                                offset=ids_end)
  return {
      "ids": ids.astype(np.int32),
      "sentence_ends": sentence_ends.astype(np.int32),
      "source": data[ends_end:].decode("utf-8", errors="replace"),
      "tokenizer_fingerprint": fingerprint.decode("ascii", errors="replace"),
  }


class _ArrayRecordDocuments(Sequence[dict[str, Any]]):
  """Random access to the records of one ArrayRecord file; picklable.

  Each process opens its own reader on first access.
  """

  def __init__(self, path: str):
    self._path = path
    self._reader = None
    self._length = self._open().num_records()

  def _open(self):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

    # No readahead: elements are read in shuffled order.
    reader = array_record_module.ArrayRecordReader(
        self._path, options="readahead_buffer_size:0",
        file_reader_buffer_size=32768)
    if not reader.ok():
      raise ValueError(
          f"{self._path!r} is not a readable ArrayRecord file. Write shards "
          f"with launch/prepare_data.py, or remove it from "
          f"--config.data.train_files.")
    self._reader = reader
    return reader

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    if not 0 <= index < self._length:
      raise IndexError(f"Record {index} out of range for {self._length} "
                       f"records in {self._path}.")
    reader = self._reader or self._open()
    (data,) = reader.read([int(index)])
    return decode_record(data, where=f"{self._path}#{index}")

  def __getstate__(self):
    return {"path": self._path, "length": self._length}

  def __setstate__(self, state):
    self._path = state["path"]
    self._length = state["length"]
    self._reader = None


def _read_array_record(path: str) -> tuple[Sequence[dict[str, Any]],
                                            FileStats]:
  stats = FileStats(path)
  if os.path.getsize(path) == 0:
    return [], stats
  documents = _ArrayRecordDocuments(path)
  stats.records = stats.documents = len(documents)
  return documents, stats


def _fingerprint_mismatch_message(where: str, found: str, tokenizer) -> str:
  return (
      f"{where} was tokenized by a tokenizer with fingerprint {found}, but "
      f"this run uses {tokenizer!r} (fingerprint {tokenizer.fingerprint}). Set "
      f"--config.data.tokenizer to the tokenizer.model that "
      f"launch/prepare_data.py saved next to the shards.")


def check_shard_tokenizer(data_config, tokenizer) -> None:
  """Checks that the configured ArrayRecord shards match `tokenizer`.

  Reads the first record of each shard, so it is cheap enough to run at
  startup.

  Raises:
    ValueError: if a shard was written with another tokenizer or is not a
      readable ArrayRecord file.
  """
  for _, paths in resolve_train_files(data_config):
    for path in paths:
      if _extension(path) != ".array_record" or os.path.getsize(path) == 0:
        continue
      documents = _ArrayRecordDocuments(path)
      if len(documents):  # pylint: disable=g-explicit-length-test
        found = documents[0]["tokenizer_fingerprint"]
        if found != tokenizer.fingerprint:
          raise ValueError(
              _fingerprint_mismatch_message(path, found, tokenizer))


def has_pretokenized_files(data_config) -> bool:
  """Returns whether any configured training file is an ArrayRecord shard."""
  return any(_extension(path) == ".array_record"
             for _, paths in resolve_train_files(data_config)
             for path in paths)


def tokenize_element(tokenizer, element: dict[str, Any]) -> dict[str, Any]:
  """Returns `{"ids", "sentence_ends", "source"}` for any source's element.

  Text elements are tokenized with `sentences.tokenize_document`; elements
  from ArrayRecord shards are passed through after checking that they were
  written with this tokenizer.

  Args:
    tokenizer: a `mtl_lm.tokenizer.Tokenizer`.
    element: an element of `load_documents` or `load_sources`.

  Raises:
    ValueError: if a pre-tokenized element comes from another tokenizer.
  """
  if "text" in element:
    tokenized = sentences.tokenize_document(tokenizer, element["text"])
    tokenized["source"] = element["source"]
    return tokenized
  if element["tokenizer_fingerprint"] != tokenizer.fingerprint:
    raise ValueError(_fingerprint_mismatch_message(
        element["source"], element["tokenizer_fingerprint"], tokenizer))
  return {"ids": element["ids"], "sentence_ends": element["sentence_ends"],
          "source": element["source"]}


def write_array_record_shards(documents: Sequence[dict[str, Any]], tokenizer,
                              *, output_dir: str, num_shards: int,
                              log_every: int = 10_000) -> list[str]:
  """Tokenizes documents and writes them as ArrayRecord shards.

  Shard k of n contains a contiguous block of about len(documents) / n
  documents, in order, as `encode_record` records. Documents that encode to
  nothing are left out. A copy of the tokenizer is saved as
  `output_dir/tokenizer.model`, to pass as --config.data.tokenizer when
  training on the shards.

  Args:
    documents: elements of `load_documents`.
    tokenizer: a `mtl_lm.tokenizer.Tokenizer`.
    output_dir: folder for the shards, which must contain no .array_record
      file.
    num_shards: number of shard files, at least 1 and at most the number of
      documents.
    log_every: log progress after every this many documents.

  Returns:
    The shard paths, `output_dir/train-KKKKK-of-NNNNN.array_record`.

  Raises:
    ValueError: for an invalid num_shards or a folder that already contains
      shards.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  num_documents = len(documents)
  if not 1 <= num_shards <= num_documents:
    raise ValueError(
        f"num_shards={num_shards} must be between 1 and the number of "
        f"documents, {num_documents}.")
  output_dir = os.path.expanduser(output_dir)
  os.makedirs(output_dir, exist_ok=True)
  existing = sorted(glob.glob(os.path.join(output_dir, "*.array_record")))
  if existing:
    raise ValueError(
        f"{output_dir!r} already contains {len(existing)} .array_record files "
        f"(e.g. {existing[0]!r}); a glob over the folder would mix old and new "
        f"shards. Choose an empty --output_dir or delete them.")

  paths = []
  written = empty = tokens = seen = 0
  start_time = time.monotonic()
  for shard in range(num_shards):
    begin = shard * num_documents // num_shards
    end = (shard + 1) * num_documents // num_shards
    path = os.path.join(output_dir,
                        f"train-{shard:05d}-of-{num_shards:05d}.array_record")
    temporary = path + ".tmp"
    writer = array_record_module.ArrayRecordWriter(temporary, "group_size:1")
    if not writer.ok():
      raise ValueError(f"Cannot create {temporary!r}; check that "
                       f"{output_dir!r} is writable.")
    for index in range(begin, end):
      element = tokenize_element(tokenizer, documents[index])
      seen += 1
      if len(element["ids"]):  # pylint: disable=g-explicit-length-test
        writer.write(encode_record(
            element["ids"], element["sentence_ends"],
            tokenizer_fingerprint=tokenizer.fingerprint,
            source=element["source"]))
        written += 1
        tokens += len(element["ids"])
      else:
        empty += 1
      if seen % log_every == 0:
        elapsed = time.monotonic() - start_time
        logging.info("Tokenized %d/%d documents (%.0f documents/s), %d tokens.",
                     seen, num_documents, seen / elapsed, tokens)
    writer.close()
    os.replace(temporary, path)
    paths.append(path)

  tokenizer.save(os.path.join(output_dir, "tokenizer.model"))
  logging.info(
      "Wrote %d documents (%d tokens) to %d shards in %s in %.1f s; left out "
      "%d documents that encode to nothing.", written, tokens, num_shards,
      output_dir, time.monotonic() - start_time, empty)
  return paths


# ---------------------------------------------------------------------------
# Sources.


def _read_any(path: str, data_config) -> tuple[Sequence[dict[str, Any]],
                                               FileStats]:
  if _extension(path) == ".array_record":
    return _read_array_record(path)
  return read_text_file(path, field=data_config.jsonl_field,
                        max_bad_fraction=data_config.max_bad_fraction)


def _log_summary(name: str, all_stats: Sequence[FileStats]) -> None:
  totals = FileStats(name)
  for stats in all_stats:
    for field in ("records", "documents", "characters", "empty",
                  "invalid_utf8", "skipped"):
      setattr(totals, field, getattr(totals, field) + getattr(stats, field))
  empty_files = [s.path for s in all_stats if s.documents == 0]
  pretokenized = sum(s.documents for s in all_stats
                     if _extension(s.path) == ".array_record")
  logging.info(
      "Source %s: %d files, %d documents (%d of them pre-tokenized), %d "
      "characters of text; skipped %d empty documents and %d unusable "
      "records; replaced invalid UTF-8 in %d records.", name, len(all_stats),
      totals.documents, pretokenized, totals.characters, totals.empty,
      totals.skipped, totals.invalid_utf8)
  if empty_files:
    logging.warning("Source %s: %d files without usable documents, e.g. %s.",
                    name, len(empty_files), empty_files[:3])


def _load_source(name: str, paths: Sequence[str],
                 data_config) -> grain.MapDataset:
  datasets, all_stats = [], []
  for path in paths:
    documents, stats = _read_any(path, data_config)
    all_stats.append(stats)
    if len(documents):  # pylint: disable=g-explicit-length-test
      datasets.append(grain.MapDataset.source(documents))
  _log_summary(name, all_stats)
  if not datasets:
    raise ValueError(
        f"No usable documents in {name!r} (files: {list(paths)[:5]}"
        f"{' ...' if len(paths) > 5 else ''}): every file is empty or has only "
        f"blank documents. Point --config.data.train_files at text.")
  if len(datasets) == 1:
    return datasets[0]
  return grain.MapDataset.concatenate(datasets)


def load_sources(data_config) -> list[tuple[str, grain.MapDataset, float]]:
  """Reads each glob of `data_config.train_files` as one weighted source.

  All globs are expanded and checked, and the weights parsed, before any file
  is read.

  Args:
    data_config: the `config.data` ConfigDict.

  Returns:
    `(name, documents, weight)` per glob, in train_files order. The name is
    the glob, or "cpython_docs" for the default corpus. The documents are a
    `grain.MapDataset` of the elements described in the module docstring.
    The weights sum to 1. Without train_weights, each weight is proportional
    to the source's number of documents, so that mixing draws every document
    with the same probability.

  Raises:
    ValueError: for globs that match nothing, unsupported files, invalid
      weights, too many bad records, or a source without usable documents.
  """
  resolved = resolve_train_files(data_config)
  if not resolved:
    path = default_corpus.default_corpus_path()
    resolved = [("cpython_docs", [path])]
  weights = parse_train_weights(data_config, len(resolved))

  sources = []
  for name, paths in resolved:
    sources.append((name, _load_source(name, paths, data_config)))
  if weights is None:
    weights = [float(len(documents)) for _, documents in sources]
  total = sum(weights)
  result = [(name, documents, weight / total)
            for (name, documents), weight in zip(sources, weights)]
  if len(result) > 1:
    logging.info("Source weights: %s.",
                 ", ".join(f"{name}={weight:.4f}" for name, _, weight in result))
  return result


def load_documents(data_config) -> grain.MapDataset:
  """Returns every training document, all sources concatenated in order.

  Elements are described in the module docstring; weights are ignored (use
  `load_sources` to mix sources by weight).
  """
  datasets = [documents for _, documents, _ in load_sources(data_config)]
  if len(datasets) == 1:
    return datasets[0]
  return grain.MapDataset.concatenate(datasets)


def sample_texts(documents: Sequence[dict[str, Any]], *, max_chars: int,
                 seed: int) -> Iterator[str]:
  """Yields texts of documents in a seeded random order up to `max_chars`.

  Used to train a tokenizer on a deterministic sample of a large corpus.

  Raises:
    ValueError: if no document has text, i.e. every source is pre-tokenized.
  """
  order = np.random.default_rng(seed).permutation(len(documents))
  total = 0
  found_text = False
  # NOTE: pre-tokenized elements are skipped; `train_tokenizer_on_corpus`
  # rejects corpora that contain any, since their ids need the old tokenizer.
  for index in order:
    element = documents[int(index)]
    if "text" not in element:
      continue
    found_text = True
    yield element["text"]
    total += len(element["text"])
    if total >= max_chars:
      return
  if not found_text:
    raise ValueError(
        "Cannot train a tokenizer on pre-tokenized ArrayRecord shards. Set "
        "--config.data.tokenizer to the tokenizer.model that "
        "launch/prepare_data.py saved next to the shards.")
