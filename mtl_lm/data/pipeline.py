"""Grain input pipeline: documents to packed, task-mixed training batches.

Stages, per process:

1. Documents of each source (`mtl_lm.data.sources.load_sources`, one per glob
   of `config.data.train_files`), sliced so that process i of n reads
   documents i, i + n, i + 2n, ... of each.
2. Tokenization, once at startup, sentence by sentence
   (`sources.tokenize_element`); pre-tokenized shards are used as they are.
   Empty documents are dropped and counted.
3. Per task with a non-zero rate: each source is shuffled with a seed and
   repeated forever (every epoch in a new order), and the sources are mixed by
   their weights. Each document becomes the task's examples
   (`mtl_lm.data.corruptions`), drawn with a generator seeded by the record's
   index, so that a record always gives the same example.
4. lm, mlm and rtd examples are packed into rows of `seq_len` by Grain's
   first-fit packing, which numbers the documents of a row 1, 2, ... in
   `segment_ids` and restarts `positions` at each. A sop example fills one row
   on its own, padded, because the sop head pools over the row.
5. Each task's rows are batched to its exact share of the per-process batch
   (largest-remainder rounding of the rates), and the task batches are zipped
   and concatenated, so every batch contains the same number of rows per task.

All randomness (shuffles, corruptions, packing order) derives from
`config.data.shuffle_seed`. The iterator state is a small JSON-able dict
(`get_state`/`set_state`); restoring it replays exactly the remaining batches.
"""

import collections
import functools
import json
import math
import time
from typing import Any, Iterator, Mapping, Sequence

from absl import logging
import grain
import jax
import numpy as np

from mtl_lm import tasks
from mtl_lm import tokenizer as tokenizer_lib
from mtl_lm.data import corruptions
from mtl_lm.data import sources

# Keys of every training batch (see `make_train_iterator`).
BATCH_KEYS = ("input_ids", "original_ids", "targets", "loss_weights",
              "segment_ids", "positions", "task_id", "sop_label")
RTD_REPLACEMENTS = ("random", "unigram", "generator")

# The token-level fields of an example. For packing they are stacked as the
# columns of one int32 [length, 4] array (loss weights are 0 or 1), because
# Grain's packer spends most of its time per feature.
_PACKED_KEYS = ("input_ids", "original_ids", "targets", "loss_weights")
_STACKED_KEY = "stacked"
# Rows that first-fit packing fills before emitting them. More bins leave less
# padding (short pieces find a gap) at the cost of a little latency.
_NUM_PACKING_BINS = 16
# The tokenized documents are in memory: reading them in threads would only
# contend for the GIL (Grain's ReadOptions recommends 0 threads for this).
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
# Fixed salts that separate the seeds of the shuffle, the examples and the
# packing of each task.
_SHUFFLE_SALT, _EXAMPLE_SALT, _PACKING_SALT = 0, 1, 2
_MAX_SOP_SEGMENTS = 8  # 8! = 40320 sop classes.


def _derive_seed(*keys: int) -> int:
  """Derives a uint32 seed from every key."""
  return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _task_rates(data_config) -> dict[str, float]:
  rates = dict(data_config.task_rates)
  unknown = sorted(set(rates) - set(tasks.TASK_NAMES))
  if unknown:
    raise ValueError(
        f"config.data.task_rates has unknown tasks {unknown}; the tasks are "
        f"{tasks.TASK_NAMES}.")
  rates = {name: float(rates.get(name, 0.0)) for name in tasks.TASK_NAMES}
  for name, rate in rates.items():
    if not (math.isfinite(rate) and rate >= 0):
      raise ValueError(
          f"config.data.task_rates.{name}={rate} is invalid; rates must be "
          "finite and non-negative.")
  if sum(rates.values()) <= 0:
    raise ValueError(
        f"config.data.task_rates={rates} are all zero; give at least one "
        "task a positive rate, e.g. --config.data.task_rates.lm=1.0.")
  return rates


def task_batch_sizes(task_rates: Mapping[str, float],
                     batch_size: int) -> dict[str, int]:
  """Splits a batch among tasks in proportion to their rates.

  Largest-remainder rounding: every task gets the floor of its share and the
  rows left over go to the largest fractional parts (ties to the task that
  comes first in `tasks.TASK_NAMES`). The sizes sum to `batch_size`.

  Args:
    task_rates: non-negative rate per task name; normalised by their sum.
    batch_size: rows to split.

  Returns:
    Rows per task, for every task in `tasks.TASK_NAMES`.
  """
  names = list(tasks.TASK_NAMES)
  total = sum(float(task_rates.get(name, 0.0)) for name in names)
  if total <= 0:
    raise ValueError(f"task_rates={dict(task_rates)} are all zero; give at "
                     "least one task a positive rate.")
  quotas = [float(task_rates.get(name, 0.0)) / total * batch_size
            for name in names]
  sizes = [math.floor(quota) for quota in quotas]
  left_over = batch_size - sum(sizes)
  # Rounded so that equal rates tie exactly despite float error.
  by_remainder = sorted(range(len(names)),
                        key=lambda i: (-round(quotas[i] - sizes[i], 9), i))
  for i in by_remainder[:left_over]:
    sizes[i] += 1
  return dict(zip(names, sizes))


def _process_shard(process_index: int | None,
                   process_count: int | None) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} is outside [0, {process_count}); "
        "pass the index of this process among process_count processes.")
  return process_index, process_count


def validate_data_config(config, *, process_count: int) -> None:
  """Raises ValueError naming the field and the fix for invalid data options.

  Args:
    config: the full config (`config.data` and `config.rtd` are read).
    process_count: number of processes that split the global batch.
  """
  data = config.data
  _task_rates(data)
  if data.batch_size <= 0 or data.batch_size % process_count:
    raise ValueError(
        f"config.data.batch_size={data.batch_size} must be a positive "
        f"multiple of the process count {process_count}, because each "
        "process loads batch_size / process_count rows.")
  if data.seq_len < 2 * data.sop_num_segments + 1 or data.seq_len < 3:
    raise ValueError(
        f"config.data.seq_len={data.seq_len} is too short: it needs room for "
        f"BOS, EOS and {data.sop_num_segments} sop segments; use seq_len >= "
        f"{max(3, 2 * data.sop_num_segments + 1)}.")
  if not 0.0 < data.mask_rate < 1.0:
    raise ValueError(f"config.data.mask_rate={data.mask_rate} must be in "
                     "(0, 1); BERT uses 0.15.")
  variant = data.get("mlm_variant", "token")
  if variant not in corruptions.MLM_VARIANTS:
    raise ValueError(f"config.data.mlm_variant={variant!r} is unknown; use "
                     f"one of {corruptions.MLM_VARIANTS}.")
  if not 2 <= data.sop_num_segments <= _MAX_SOP_SEGMENTS:
    raise ValueError(
        f"config.data.sop_num_segments={data.sop_num_segments} must be in "
        f"[2, {_MAX_SOP_SEGMENTS}]; the sop head has k! classes.")
  if config.rtd.replacements not in RTD_REPLACEMENTS:
    raise ValueError(f"config.rtd.replacements={config.rtd.replacements!r} is "
                     f"unknown; use one of {RTD_REPLACEMENTS}.")
  if data.num_workers < 0:
    raise ValueError(f"config.data.num_workers={data.num_workers} must be >= "
                     "0 (0 reads in the training process).")


def tokenize_documents(documents: grain.MapDataset,
                       tokenizer) -> list[dict[str, Any]]:
  """Tokenizes every document once, dropping (and logging) empty ones.

  Args:
    documents: elements of `sources.load_documents`: `text` and `source`, or
      pre-tokenized `ids`, `sentence_ends`, `source` and
      `tokenizer_fingerprint`.
    tokenizer: a `mtl_lm.tokenizer.Tokenizer`.

  Returns:
    Dicts with `ids` int32 [n], `sentence_ends` int32 [m] and `source`, in the
    order of `documents`.
  """
  start = time.perf_counter()
  tokenized = []
  num_empty = 0
  num_tokens = 0
  for document in documents.to_iter_dataset(_READ_OPTIONS):
    result = sources.tokenize_element(tokenizer, document)
    if len(result["ids"]) == 0:
      num_empty += 1
      continue
    num_tokens += len(result["ids"])
    tokenized.append({
        "ids": np.asarray(result["ids"], np.int32),
        "sentence_ends": np.asarray(result["sentence_ends"], np.int32),
        "source": str(result["source"]),
    })
  logging.info(
      "Tokenized %d documents (%d tokens) in %.1f s; dropped %d empty ones.",
      len(tokenized), num_tokens, time.perf_counter() - start, num_empty)
  return tokenized


def count_token_ids(documents: Sequence[Mapping[str, Any]],
                    vocab_size: int) -> np.ndarray:
  """Counts each id over tokenized documents; int64 [vocab_size]."""
  counts = np.zeros(vocab_size, np.int64)
  for document in documents:
    counts += np.bincount(document["ids"], minlength=vocab_size)[:vocab_size]
  return counts


def _global_token_counts(local_counts: np.ndarray,
                         process_count: int) -> np.ndarray:
  """Sums the counts of every process, so each uses the same distribution."""
  if process_count == 1 or jax.process_count() != process_count:
    return local_counts
  # NOTE: no test runs several JAX processes, so this gather is unexercised.
  # Imported here: only multi-process runs need it.
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # float32 because jax truncates int64 to int32 unless x64 is enabled; the
  # small rounding does not matter for a sampling distribution.
  gathered = multihost_utils.process_allgather(
      local_counts.astype(np.float32))
  return np.asarray(gathered).sum(axis=0)


def summarize_sop_documents(documents: Sequence[Mapping[str, Any]], *,
                            seq_len: int,
                            num_segments: int) -> dict[str, int]:
  """Counts the sop examples and dropped documents of one epoch.

  Returns:
    `documents`, `examples`, `short_documents` (fewer than k sentences,
    dropped), `unfit_documents` (k sentences or more but no window of k fits
    seq_len, dropped) and `skipped_sentences` (left out of any window).
  """
  summary = collections.Counter(documents=len(documents))
  for document in documents:
    if len(document["sentence_ends"]) < num_segments:
      summary["short_documents"] += 1
      continue
    windows, skipped = corruptions.sop_windows(
        document["sentence_ends"], seq_len=seq_len, num_segments=num_segments)
    summary["examples"] += len(windows)
    summary["skipped_sentences"] += skipped
    if not windows:
      summary["unfit_documents"] += 1
  for key in ("examples", "short_documents", "unfit_documents",
              "skipped_sentences"):
    summary.setdefault(key, 0)
  return dict(summary)


def _stack_for_packing(piece: Mapping[str, np.ndarray],
                       source: str) -> dict[str, Any]:
  """Returns `{"stacked": int32 [length, 4], "source": source}`."""
  stacked = np.stack([np.asarray(piece[key], np.int32) for key in _PACKED_KEYS],
                     axis=1)
  return {_STACKED_KEY: stacked, "source": source}


class _LmExamples(grain.transforms.Map):
  """Document -> list of stacked next-token pieces (no randomness)."""

  def __init__(self, *, seq_len: int):
    self._seq_len = seq_len

  def map(self, document):
    pieces = corruptions.lm_pieces(document["ids"], document["sentence_ends"],
                                   seq_len=self._seq_len)
    return [_stack_for_packing(piece, document["source"]) for piece in pieces]


class _EncoderExamples(grain.transforms.RandomMap):
  """Document -> list of stacked `[BOS] chunk [EOS]` pieces, each corrupted."""

  def __init__(self, *, seq_len: int, corrupt):
    self._seq_len = seq_len
    self._corrupt = corrupt

  def random_map(self, document, rng):
    return [
        _stack_for_packing(self._corrupt(ids, rng), document["source"])
        for ids in corruptions.encoder_pieces(
            document["ids"], document["sentence_ends"], seq_len=self._seq_len)
    ]


class _SopExamples(grain.transforms.RandomMap):
  """Document -> list of sentence-order examples, one per window."""

  def __init__(self, *, seq_len: int, num_segments: int,
               is_whitespace: np.ndarray):
    self._seq_len = seq_len
    self._num_segments = num_segments
    self._is_whitespace = is_whitespace

  def random_map(self, document, rng):
    if len(document["sentence_ends"]) < self._num_segments:
      return []
    windows, _ = corruptions.sop_windows(
        document["sentence_ends"], seq_len=self._seq_len,
        num_segments=self._num_segments)
    examples = []
    for window in windows:
      example = corruptions.sop_example(document["ids"], window, rng,
                                        is_whitespace=self._is_whitespace)
      example["source"] = document["source"]
      examples.append(example)
    return examples


class _Flatten(grain.experimental.FlatMapTransform):
  """List of examples -> the examples, one element each."""

  max_fan_out = 1  # Unused by FlatMapIterDataset.

  def flat_map(self, element):
    return element


class _PackedRow(grain.transforms.Map):
  """Packer output -> a row with the batch fields (and metadata if kept)."""

  def __init__(self, *, task: str, keep_metadata: bool):
    self._task = task
    self._task_id = np.int32(tasks.TASK_IDS[task])
    self._keep_metadata = keep_metadata

  def map(self, packed):
    stacked = packed[_STACKED_KEY]  # [seq_len, 4]
    row = {key: stacked[:, column] for column, key in enumerate(_PACKED_KEYS)}
    row["loss_weights"] = row["loss_weights"].astype(np.float32)
    row["segment_ids"] = packed[f"{_STACKED_KEY}_segment_ids"]
    row["positions"] = packed[f"{_STACKED_KEY}_positions"]
    row["task_id"] = self._task_id
    row["sop_label"] = np.int32(0)
    if self._keep_metadata:
      row["task"] = self._task
      row["sources"] = list(packed["source"])
    return row


class _PaddedSopRow(grain.transforms.Map):
  """One sop example -> a padded row (with metadata if kept)."""

  def __init__(self, *, seq_len: int, keep_metadata: bool):
    self._seq_len = seq_len
    self._keep_metadata = keep_metadata

  def map(self, example):
    length = len(example["input_ids"])
    row = {}
    for key in _PACKED_KEYS:
      padded = np.zeros(self._seq_len, example[key].dtype)
      padded[:length] = example[key]
      row[key] = padded
    row["segment_ids"] = (np.arange(self._seq_len) < length).astype(np.int32)
    positions = np.arange(self._seq_len, dtype=np.int32)
    row["positions"] = np.where(row["segment_ids"] > 0, positions, 0)
    row["task_id"] = np.int32(tasks.TASK_IDS[tasks.SOP])
    row["sop_label"] = example["sop_label"]
    if self._keep_metadata:
      row["task"] = tasks.SOP
      row["sources"] = [example["source"]]
      row["sop_permutation"] = example["sop_permutation"]
      row["sop_segment_spans"] = example["sop_segment_spans"]
    return row


def _word_tables(tokenizer) -> tuple[np.ndarray, np.ndarray]:
  pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
  return corruptions.word_boundary_tables(pieces)


_WHITESPACE_PIECES = frozenset(
    ["<0x09>", "<0x0A>", "<0x0B>", "<0x0C>", "<0x0D>", "<0x20>"])


def _whitespace_table(tokenizer) -> np.ndarray:
  """Returns bool [vocab], True for pieces that are only whitespace."""
  table = np.zeros(tokenizer.vocab_size, bool)
  for token_id in range(tokenizer_lib.NUM_RESERVED_IDS, tokenizer.vocab_size):
    piece = tokenizer.id_to_piece(token_id)
    table[token_id] = piece in _WHITESPACE_PIECES or (
        piece != "" and not piece.replace("\u2581", " ").strip())
  return table


def _example_transforms(config, tokenizer, documents, *,
                        active_tasks: Sequence[str],
                        process_count: int) -> dict[str, Any]:
  """Builds the per-document transform of each active task."""
  data = config.data
  vocab_size = tokenizer.vocab_size
  variant = data.get("mlm_variant", "token")
  word_tables = {}
  if variant != "token" and ({tasks.MLM, tasks.RTD} & set(active_tasks)):
    begins_word, ends_word = _word_tables(tokenizer)
    word_tables = {"begins_word": begins_word, "ends_word": ends_word}
  selection = dict(vocab_size=vocab_size, mask_rate=data.mask_rate,
                   variant=variant, **word_tables)

  transforms = {}
  for task in active_tasks:
    if task == tasks.LM:
      transforms[task] = _LmExamples(seq_len=data.seq_len)
    elif task == tasks.MLM:
      corrupt = functools.partial(corruptions.mask_tokens, **selection)
      transforms[task] = _EncoderExamples(seq_len=data.seq_len,
                                          corrupt=corrupt)
    elif task == tasks.RTD:
      replacement_cdf = None
      if config.rtd.replacements == "unigram":
        counts = _global_token_counts(
            count_token_ids(documents, vocab_size), process_count)
        replacement_cdf = corruptions.unigram_cdf(counts)
      corrupt = functools.partial(
          corruptions.replace_tokens, replacement_cdf=replacement_cdf,
          use_generator=config.rtd.replacements == "generator", **selection)
      transforms[task] = _EncoderExamples(seq_len=data.seq_len,
                                          corrupt=corrupt)
    elif task == tasks.SOP:
      transforms[task] = _SopExamples(seq_len=data.seq_len,
                                      num_segments=data.sop_num_segments,
                                      is_whitespace=_whitespace_table(tokenizer))
  return transforms


def _log_document_summary(config, documents, active_tasks) -> None:
  """Logs, once per run, how many documents each task splits or drops."""
  data = config.data
  num_documents = len(documents)
  lengths = np.asarray([len(d["ids"]) for d in documents])
  if tasks.LM in active_tasks:
    logging.info("lm: %d of %d documents are longer than seq_len=%d and are "
                 "cut into several pieces.",
                 int(np.count_nonzero(lengths + 1 > data.seq_len)),
                 num_documents, data.seq_len)
  if {tasks.MLM, tasks.RTD} & set(active_tasks):
    logging.info("mlm/rtd: %d of %d documents are cut into several pieces.",
                 int(np.count_nonzero(lengths + 2 > data.seq_len)),
                 num_documents)
  if tasks.SOP in active_tasks:
    summary = summarize_sop_documents(documents, seq_len=data.seq_len,
                                      num_segments=data.sop_num_segments)
    logging.info(
        "sop: %d examples per epoch from %d documents; dropped %d documents "
        "with fewer than %d sentences and %d whose sentences fit no window; "
        "skipped %d sentences that fit no window.",
        summary["examples"], num_documents, summary["short_documents"],
        data.sop_num_segments, summary["unfit_documents"],
        summary["skipped_sentences"])
    if summary["examples"] == 0:
      raise ValueError(
          f"sop has no examples: none of the {num_documents} documents has "
          f"{data.sop_num_segments} sentences that fit seq_len={data.seq_len}. "
          "Use documents of several sentences, a larger seq_len, or set "
          "config.data.task_rates.sop=0.")


def _load_token_sources(config, tokenizer, *, process_index: int,
                        process_count: int,
                        documents: grain.MapDataset | None
                        ) -> list[tuple[str, list[dict[str, Any]], float]]:
  """Reads this process's slice of every source and tokenizes it.

  Returns:
    `(name, tokenized documents, weight)` per source; weights sum to 1.
  """
  if documents is None:
    loaded = sources.load_sources(config.data)
  else:
    loaded = [("documents", documents, 1.0)]
  token_sources = []
  for name, source_documents, weight in loaded:
    num_documents = len(source_documents)
    shard = source_documents[process_index::process_count]
    token_documents = tokenize_documents(shard, tokenizer)
    if not token_documents:
      raise ValueError(
          f"Source {name} has no non-empty document for process "
          f"{process_index} of {process_count} ({num_documents} documents in "
          "all). Give it more documents than there are processes, or remove "
          "it from config.data.train_files.")
    token_sources.append((name, token_documents, weight))
  return token_sources


def _document_stream(token_sources, *, task_id: int,
                     seed: int) -> grain.MapDataset:
  """Infinite stream of documents: each source shuffled, then mixed by weight.

  Every source gets its own seeded shuffle, reshuffled at each of its epochs
  and different for every task, so that the tasks see documents in
  independent orders.
  """
  streams = []
  for source_index, (_, token_documents, _) in enumerate(token_sources):
    streams.append(grain.MapDataset.source(token_documents).shuffle(
        seed=_derive_seed(seed, task_id, _SHUFFLE_SALT, source_index)).repeat())
  if len(streams) == 1:
    return streams[0]
  return grain.MapDataset.mix(streams, [weight for *_, weight in token_sources])


def _task_rows(task: str, documents: grain.MapDataset, transform, *,
               seq_len: int, seed: int,
               keep_metadata: bool) -> grain.IterDataset:
  """Rows of one task; metadata: `task`, `sources` and the sop fields."""
  task_id = tasks.TASK_IDS[task]
  if isinstance(transform, grain.transforms.RandomMap):
    examples = documents.random_map(
        transform, seed=_derive_seed(seed, task_id, _EXAMPLE_SALT))
  else:
    examples = documents.map(transform)
  examples = grain.experimental.FlatMapIterDataset(
      examples.to_iter_dataset(_READ_OPTIONS), _Flatten())
  if task == tasks.SOP:
    return examples.map(_PaddedSopRow(seq_len=seq_len,
                                      keep_metadata=keep_metadata))
  packed = grain.experimental.FirstFitPackIterDataset(
      examples,
      length_struct={_STACKED_KEY: seq_len},
      num_packing_bins=_NUM_PACKING_BINS,
      seed=_derive_seed(seed, task_id, _PACKING_SALT),
      meta_features=("source",) if keep_metadata else ())
  return packed.map(_PackedRow(task=task, keep_metadata=keep_metadata))


def _build_task_rows(
    config, tokenizer, *, process_index: int, process_count: int,
    documents: grain.MapDataset | None, keep_metadata: bool
) -> tuple[dict[str, grain.IterDataset], dict[str, int]]:
  """Shards, tokenizes and builds the row stream of every active task."""
  validate_data_config(config, process_count=process_count)
  data = config.data
  local_batch_size = data.batch_size // process_count
  rates = _task_rates(data)
  sizes = task_batch_sizes(rates, local_batch_size)
  for name, rate in rates.items():
    if rate > 0 and sizes[name] == 0:
      logging.warning(
          "Task %s has rate %g but gets no row of the %d-row batch per "
          "process; raise its rate or config.data.batch_size to train it.",
          name, rate, local_batch_size)
  active_tasks = [name for name in tasks.TASK_NAMES if sizes[name] > 0]

  token_sources = _load_token_sources(
      config, tokenizer, process_index=process_index,
      process_count=process_count, documents=documents)
  all_documents = [document for _, token_documents, _ in token_sources
                   for document in token_documents]
  _log_document_summary(config, all_documents, active_tasks)
  transforms = _example_transforms(config, tokenizer, all_documents,
                                   active_tasks=active_tasks,
                                   process_count=process_count)
  rows = {}
  for task in active_tasks:
    stream = _document_stream(token_sources, task_id=tasks.TASK_IDS[task],
                              seed=data.shuffle_seed)
    rows[task] = _task_rows(task, stream, transforms[task],
                            seq_len=data.seq_len, seed=data.shuffle_seed,
                            keep_metadata=keep_metadata)
  sizes = {task: sizes[task] for task in active_tasks}
  logging.info("Per-process batch of %d rows: %s.", local_batch_size, sizes)
  return rows, sizes


class _ConcatenateTasks(grain.transforms.Map):
  """Per-task batches -> one batch; logs the share of padding now and then."""

  def __init__(self):
    self._num_positions = 0
    self._num_padding = 0

  def map(self, task_batches):
    batch = {key: np.concatenate([task_batch[key] for task_batch in
                                  task_batches])
             for key in BATCH_KEYS}
    self._num_positions += batch["segment_ids"].size
    self._num_padding += int(np.count_nonzero(batch["segment_ids"] == 0))
    logging.log_every_n_seconds(
        logging.INFO, "Input pipeline: %.1f%% of the %d positions read so far "
        "are padding.", 600, 100.0 * self._num_padding / self._num_positions,
        self._num_positions)
    return batch


def _as_list(rows):
  return list(rows)


class _Unbatch(grain.experimental.FlatMapTransform):
  """Tuple of per-task row lists -> the rows, in batch order."""

  max_fan_out = 1  # Unused by FlatMapIterDataset.

  def flat_map(self, task_batches):
    return [row for batch in task_batches for row in batch]


def make_train_dataset(config, tokenizer, *, process_index: int | None = None,
                       process_count: int | None = None,
                       documents: grain.MapDataset | None = None
                       ) -> grain.IterDataset:
  """Builds the infinite dataset of per-process training batches.

  Args:
    config: the full config.
    tokenizer: a `mtl_lm.tokenizer.Tokenizer` (or any object with `encode`,
      `vocab_size` and, for word-level masking, `id_to_piece`).
    process_index: this process; default `jax.process_index()`.
    process_count: processes sharing the global batch; default
      `jax.process_count()`.
    documents: one source of documents (elements as `sources.load_documents`
      yields them) to use instead of the files of `config.data.train_files`.

  Returns:
    An `IterDataset` of dicts of numpy arrays with B = batch_size /
    process_count rows: `input_ids`, `original_ids`, `targets`,
    `segment_ids`, `positions` int32 [B, seq_len], `loss_weights` float32
    [B, seq_len], `task_id`, `sop_label` int32 [B]. Rows are grouped by task in
    `tasks.TASK_NAMES` order.
  """
  process_index, process_count = _process_shard(process_index, process_count)
  rows, sizes = _build_task_rows(config, tokenizer,
                                 process_index=process_index,
                                 process_count=process_count,
                                 documents=documents, keep_metadata=False)
  batches = [
      rows[task].batch(sizes[task], drop_remainder=True)
      for task in rows
  ]
  dataset = grain.experimental.ZipIterDataset(batches).map(
      _ConcatenateTasks())
  if config.data.num_workers > 0:
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return dataset


def make_train_iterator(config, tokenizer, *,
                        process_index: int | None = None,
                        process_count: int | None = None,
                        documents: grain.MapDataset | None = None
                        ) -> grain.DatasetIterator:
  """Returns an iterator over `make_train_dataset`'s batches.

  The iterator's `get_state()` is a JSON-able dict; `set_state()` on a fresh
  iterator built with the same config, tokenizer and process yields the
  batches that followed. For Orbax, `grain.checkpoint.CheckpointSave(it)` and
  `CheckpointRestore(it)` save one JSON file per process.
  """
  return iter(make_train_dataset(config, tokenizer,
                                 process_index=process_index,
                                 process_count=process_count,
                                 documents=documents))


def make_example_dataset(config, tokenizer, *,
                         process_index: int | None = None,
                         process_count: int | None = None,
                         documents: grain.MapDataset | None = None
                         ) -> grain.IterDataset:
  """Builds the training rows one by one, with metadata, for inspection.

  The rows come in the order of the rows of `make_train_dataset`'s batches
  (with `num_workers=0`). Each has the batch fields, as [seq_len] arrays and
  scalars, and the metadata `task` (name) and `sources` (the source of each
  packed document, in segment id order). Sop rows also have `sop_permutation`
  int32 [k] and `sop_segment_spans` int32 [k, 2].
  """
  process_index, process_count = _process_shard(process_index, process_count)
  rows, sizes = _build_task_rows(config, tokenizer,
                                 process_index=process_index,
                                 process_count=process_count,
                                 documents=documents, keep_metadata=True)
  batches = [
      rows[task].batch(sizes[task], drop_remainder=True, batch_fn=_as_list)
      for task in rows
  ]
  return grain.experimental.FlatMapIterDataset(
      grain.experimental.ZipIterDataset(batches), _Unbatch())


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh,
                      sharding=None) -> dict[str, jax.Array]:
  """Assembles every process's batch into global arrays.

  Args:
    local_batch: this process's batch, arrays with a leading [B] axis.
    mesh: the device mesh, with "data" and "fsdp" axes.
    sharding: sharding of the batch axis; default
      `NamedSharding(mesh, PartitionSpec(("data", "fsdp")))`.

  Returns:
    One `jax.Array` per field with a leading [B * process_count] axis.
  """
  if sharding is None:
    sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  # NOTE: the global shape is inferred by assuming that every process has a
  # distinct slice of the batch. That fails if the batch axis is replicated
  # across processes (e.g. a tensor axis spanning hosts).
  return {
      key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
      for key, value in local_batch.items()
  }


def _decode_with_markers(tokenizer, ids: np.ndarray) -> str:
  """Decodes ids, writing special ids (which decode to "") as markers."""
  markers = {
      tokenizer_lib.UNK_ID: "<unk>", tokenizer_lib.BOS_ID: "<s>",
      tokenizer_lib.EOS_ID: "</s>", tokenizer_lib.MASK_ID: "<mask>",
      tokenizer_lib.SEP_ID: "<sep>",
  }
  ids = np.asarray(ids)
  ids = ids[ids != tokenizer_lib.PAD_ID]
  parts = []
  start = 0
  for index in np.flatnonzero(ids < tokenizer_lib.NUM_RESERVED_IDS):
    parts.append(tokenizer.decode(ids[start:index]))
    parts.append(markers[int(ids[index])])
    start = index + 1
  parts.append(tokenizer.decode(ids[start:]))
  return "".join(parts)


def describe_example(row: Mapping[str, Any], tokenizer) -> dict[str, Any]:
  """Turns a row of `make_example_dataset` into a JSON-able dict.

  Arrays become lists. `text` and `original_text` decode `input_ids` and
  `original_ids`, with special tokens written as `<s>`, `<mask>`, `<sep>` and
  `</s>`. Sop rows also get `sop_segment_texts`, each segment in input order.
  """
  description = {"task": row["task"], "sources": list(row["sources"])}
  for key, value in row.items():
    if key in ("task", "sources"):
      continue
    description[key] = np.asarray(value).tolist()
  description["text"] = _decode_with_markers(tokenizer, row["input_ids"])
  description["original_text"] = _decode_with_markers(tokenizer,
                                                      row["original_ids"])
  if row["task"] == tasks.SOP:
    description["sop_segment_texts"] = [
        tokenizer.decode(row["input_ids"][start:end])
        for start, end in np.asarray(row["sop_segment_spans"])
    ]
  return description


def write_examples(config, tokenizer, *, num_examples: int, output_path: str,
                   documents: grain.MapDataset | None = None) -> int:
  """Writes the first `num_examples` training rows of process 0 as JSON lines.

  Returns:
    The number of rows written.
  """
  if num_examples <= 0:
    raise ValueError(f"num_examples={num_examples} must be positive.")
  dataset = make_example_dataset(config, tokenizer, process_index=0,
                                 process_count=1, documents=documents)
  iterator: Iterator[Any] = iter(dataset)
  written = 0
  with open(output_path, "w", encoding="utf-8") as output:
    for row in iterator:
      output.write(json.dumps(describe_example(row, tokenizer),
                              ensure_ascii=False) + "\n")
      written += 1
      if written == num_examples:
        break
  logging.info("Wrote %d examples to %s.", written, output_path)
  return written
