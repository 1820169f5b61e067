"""Per-example builders for the four objectives, as pure numpy functions.

Each builder takes one tokenized document (or one piece of it) and, where it
needs randomness, a `np.random.Generator`. Grain's `random_map` seeds that
generator from the pipeline seed and the record's index, so a record gives the
same example on every host and after a resume.

Pieces and formats, with `n` the document's token count:

* lm: `[BOS] ids [EOS]` cut at sentence ends into pieces of at most
  `seq_len + 1` tokens. Consecutive pieces share one token, so that every
  next-token target of the document appears in exactly one piece.
* mlm and rtd: `ids` cut at sentence ends into chunks of at most `seq_len - 2`
  tokens, each wrapped as `[BOS] chunk [EOS]`.
* sop: `[BOS] s_1 [SEP] s_2 [SEP] ... [SEP] s_k [EOS]`, where `s_i` are k
  segments of consecutive whole sentences, shown in a random order.

A sentence longer than a piece is cut at the piece limit, so no text is lost.

Masking (mlm and rtd) selects `mask_rate` of the real tokens of a piece. The
count is `mask_rate * n_candidates` rounded stochastically (down or up, with the
fractional part as the probability of rounding up), which keeps the expected
rate exact even for short pieces, and the positions are drawn uniformly
without replacement. Candidates are the positions of non-special ids
(id >= NUM_RESERVED_IDS), so padding, BOS, EOS, SEP and MASK are never
selected. As in BERT (Devlin et al., 2019), each selected unit independently
becomes MASK with probability 0.8, a uniformly drawn non-special token with
probability 0.1, or stays unchanged with probability 0.1. A unit is a token,
or a whole word for the whole_word and span variants.
"""

import itertools
import math
from typing import Sequence
import unicodedata

import numpy as np

from mtl_lm.tokenizer import BOS_ID
from mtl_lm.tokenizer import EOS_ID
from mtl_lm.tokenizer import MASK_ID
from mtl_lm.tokenizer import NUM_RESERVED_IDS
from mtl_lm.tokenizer import SEP_ID

MLM_VARIANTS = ("token", "whole_word", "span")

# SpanBERT (Joshi et al., 2020) draws span lengths, in words, from a geometric
# distribution with p = 0.2 clipped at 10.
SPAN_GEOMETRIC_P = 0.2
SPAN_MAX_WORDS = 10

# Per-unit treatment of the selected positions, as in BERT.
_MASK_PROB = 0.8
_RANDOM_PROB = 0.1

# SentencePiece marks a preceding space with this character.
_SPACE_MARK = "\u2581"


def _chunk_offsets(cut_points: np.ndarray, total: int, *,
                   max_len: int) -> list[tuple[int, int]]:
  """Cuts [0, total) into consecutive ranges of at most `max_len`.

  Each range ends at the furthest allowed cut point within reach, or, where
  none is in reach (one sentence longer than `max_len`), at `max_len`.

  Args:
    cut_points: int [m], sorted offsets where a range may end.
    total: length of the sequence to cut.
    max_len: maximum length of a range.

  Returns:
    `(start, end)` pairs covering [0, total) without gaps or overlaps.
  """
  ranges = []
  start = 0
  while start < total:
    limit = start + max_len
    if limit >= total:
      end = total
    else:
      index = int(np.searchsorted(cut_points, limit, side="right")) - 1
      end = int(cut_points[index]) if index >= 0 else start
      if end <= start:
        end = limit
    ranges.append((start, end))
    start = end
  return ranges


def lm_pieces(ids: np.ndarray, sentence_ends: np.ndarray, *,
              seq_len: int) -> list[dict[str, np.ndarray]]:
  """Builds the next-token examples of one document.

  The document becomes `[BOS] ids [EOS]`, and its inputs are cut at sentence
  ends into pieces of at most `seq_len` tokens. Each piece predicts the token
  after each of its inputs, so the targets of consecutive pieces never overlap
  and none is lost.

  Args:
    ids: int32 [n], the document's token ids without BOS or EOS.
    sentence_ends: int32 [m], exclusive end offsets of its sentences in `ids`.
    seq_len: maximum number of inputs per piece.

  Returns:
    Pieces with `input_ids`, `original_ids`, `targets` (int32 [l]) and
    `loss_weights` (float32 [l], all ones), l <= seq_len.
  """
  tokens = np.concatenate([[BOS_ID], ids, [EOS_ID]]).astype(np.int32)
  num_inputs = len(tokens) - 1
  # A cut after sentence j starts the next piece with that sentence's
  # successor as its first input.
  cut_points = np.asarray(sentence_ends, dtype=np.int64) + 1
  pieces = []
  for start, end in _chunk_offsets(cut_points, num_inputs, max_len=seq_len):
    inputs = tokens[start:end]
    pieces.append({
        "input_ids": inputs,
        "original_ids": inputs,
        "targets": tokens[start + 1:end + 1],
        "loss_weights": np.ones(end - start, np.float32),
    })
  return pieces


def encoder_pieces(ids: np.ndarray, sentence_ends: np.ndarray, *,
                   seq_len: int) -> list[np.ndarray]:
  """Cuts a document for mlm or rtd into `[BOS] chunk [EOS]` pieces.

  Args:
    ids: int32 [n], the document's token ids.
    sentence_ends: int32 [m], exclusive end offsets of its sentences in `ids`.
    seq_len: maximum piece length, BOS and EOS included; at least 3.

  Returns:
    int32 arrays of length at most `seq_len`; none for an empty document.
  """
  if seq_len < 3:
    raise ValueError(f"seq_len={seq_len} leaves no room for text between BOS "
                     "and EOS; use seq_len >= 3.")
  ranges = _chunk_offsets(np.asarray(sentence_ends, dtype=np.int64), len(ids),
                          max_len=seq_len - 2)
  return [
      np.concatenate([[BOS_ID], ids[start:end], [EOS_ID]]).astype(np.int32)
      for start, end in ranges
  ]


def _is_cjk(char: str) -> bool:
  """True for Han, kana and CJK punctuation and full-width forms."""
  code = ord(char)
  return (0x3000 <= code <= 0x30FF or 0x3400 <= code <= 0x4DBF or
          0x4E00 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF or
          0xFF00 <= code <= 0xFFEF or 0x20000 <= code <= 0x2FA1F)


def _is_separator_char(char: str) -> bool:
  """True for characters that form a word of their own (CJK, punctuation)."""
  return (_is_cjk(char) or unicodedata.category(char).startswith("P") or
          char.isspace() or char == _SPACE_MARK)


def _byte_value(piece: str) -> int | None:
  """Parses the byte of a byte-fallback piece such as `<0x0A>`, else None."""
  if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
    try:
      return int(piece[3:5], 16)
    except ValueError:
      return None
  return None


def word_boundary_tables(
    pieces: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Marks which vocabulary pieces begin and end a word.

  A piece begins a word when it starts with SentencePiece's space mark "▁", a
  punctuation mark, whitespace or a CJK character. It ends a word when it ends
  with one of those. Chinese and Japanese have no spaces, so every CJK
  character or multi-character piece is then a word of its own. Byte-fallback
  pieces: whitespace and ASCII punctuation bytes both begin and end a word, a
  UTF-8 lead byte of a 3- or 4-byte character (mostly CJK) begins one, and
  other bytes continue the current word. Special ids do both.

  Args:
    pieces: the piece of every id, `len(pieces) == vocab_size`.

  Returns:
    `(begins_word, ends_word)`, bool [vocab_size] each.
  """
  vocab_size = len(pieces)
  begins = np.zeros(vocab_size, bool)
  ends = np.zeros(vocab_size, bool)
  for token_id, piece in enumerate(pieces):
    if token_id < NUM_RESERVED_IDS or not piece:
      begins[token_id] = ends[token_id] = True
      continue
    byte = _byte_value(piece)
    if byte is not None:
      standalone = byte < 0x80 and _is_separator_char(chr(byte))
      begins[token_id] = standalone or byte >= 0xE0
      ends[token_id] = standalone
      continue
    begins[token_id] = _is_separator_char(piece[0])
    ends[token_id] = _is_separator_char(piece[-1])
  return begins, ends


def _unit_ids(ids: np.ndarray, *, begins_word: np.ndarray | None,
              ends_word: np.ndarray | None) -> tuple[np.ndarray, int]:
  """Numbers the maskable units of a piece: tokens, or whole words.

  Args:
    ids: int32 [n].
    begins_word: bool [vocab], or None to make every token its own unit.
    ends_word: bool [vocab], or None (with `begins_word` None).

  Returns:
    `(unit_of_position, num_units)`: int64 [n], the unit index of each
    candidate position and -1 at special positions.
  """
  candidates = ids >= NUM_RESERVED_IDS
  if begins_word is None:
    starts = candidates
  else:
    previous_ends = np.ones_like(candidates)
    previous_ends[1:] = ends_word[ids[:-1]] | ~candidates[:-1]
    starts = candidates & (begins_word[ids] | previous_ends)
  unit_of_position = np.where(candidates, np.cumsum(starts) - 1, -1)
  return unit_of_position, int(np.count_nonzero(starts))


def _stochastic_round(value: float, rng: np.random.Generator) -> int:
  """Rounds up with probability equal to the fractional part."""
  floor = math.floor(value)
  return floor + int(rng.random() < value - floor)


def _select_whole_units(unit_lengths: np.ndarray, target: int,
                        rng: np.random.Generator) -> np.ndarray:
  """Selects units in random order until `target` tokens are covered.

  A unit is taken while the running count before it plus half its own length
  is below `target`, so longer words overshoot as often as they undershoot and
  single tokens hit `target` exactly.
  """
  order = rng.permutation(len(unit_lengths))
  lengths = unit_lengths[order]
  midpoints = np.cumsum(lengths) - lengths / 2
  selected = np.zeros(len(unit_lengths), bool)
  selected[order[midpoints < target]] = True
  return selected


def _select_spans(unit_lengths: np.ndarray, target: int,
                  rng: np.random.Generator, *, geometric_p: float,
                  max_span_units: int) -> np.ndarray:
  """Selects spans of consecutive units until `target` tokens are covered.

  Span lengths (in units) follow a geometric distribution clipped at
  `max_span_units`; starts are uniform. A unit of a span is kept under the
  same midpoint rule as `_select_whole_units`, and the search stops after
  eight spans in a row add nothing.
  """
  num_units = len(unit_lengths)
  selected = np.zeros(num_units, bool)
  covered = 0
  failures = 0
  while covered < target and failures < 8:
    span = min(int(rng.geometric(geometric_p)), max_span_units, num_units)
    start = int(rng.integers(0, num_units - span + 1))
    added = 0
    for unit in range(start, start + span):
      if selected[unit]:
        continue
      if covered + unit_lengths[unit] / 2 >= target:
        break
      selected[unit] = True
      covered += int(unit_lengths[unit])
      added += 1
    failures = 0 if added else failures + 1
  return selected


def select_positions(
    ids: np.ndarray, rng: np.random.Generator, *, mask_rate: float,
    variant: str = "token", begins_word: np.ndarray | None = None,
    ends_word: np.ndarray | None = None,
    span_geometric_p: float = SPAN_GEOMETRIC_P,
    span_max_words: int = SPAN_MAX_WORDS) -> tuple[np.ndarray, np.ndarray]:
  """Selects the positions that mlm predicts and rtd may replace.

  Args:
    ids: int32 [n], one piece (specials included).
    rng: generator for this example.
    mask_rate: expected share of the candidate (non-special) tokens selected.
    variant: "token" (independent tokens), "whole_word" (all tokens of a
      word, see `word_boundary_tables`) or "span" (SpanBERT spans of whole
      words, or of tokens when no word tables are given).
    begins_word: bool [vocab], required for "whole_word".
    ends_word: bool [vocab], required for "whole_word".
    span_geometric_p: parameter of the span-length distribution.
    span_max_words: maximum span length, in units.

  Returns:
    `(selected, unit_of_position)`: bool [n], and int64 [n] numbering the
    units (-1 at special positions) so that callers can treat each selected
    word alike.
  """
  if variant not in MLM_VARIANTS:
    raise ValueError(f"mlm variant {variant!r} is unknown; use one of "
                     f"{MLM_VARIANTS}.")
  if variant == "whole_word" and (begins_word is None or ends_word is None):
    raise ValueError("The whole_word variant needs begins_word and ends_word "
                     "tables; build them with word_boundary_tables().")
  use_words = variant != "token" and begins_word is not None
  unit_of_position, num_units = _unit_ids(
      ids, begins_word=begins_word if use_words else None,
      ends_word=ends_word if use_words else None)
  num_candidates = int(np.count_nonzero(unit_of_position >= 0))
  target = _stochastic_round(mask_rate * num_candidates, rng)
  if target == 0:
    return np.zeros(len(ids), bool), unit_of_position

  unit_lengths = np.bincount(unit_of_position[unit_of_position >= 0],
                             minlength=num_units)
  if variant == "span":
    selected_units = _select_spans(unit_lengths, target, rng,
                                   geometric_p=span_geometric_p,
                                   max_span_units=span_max_words)
  else:
    selected_units = _select_whole_units(unit_lengths, target, rng)
  selected = np.zeros(len(ids), bool)
  candidates = unit_of_position >= 0
  selected[candidates] = selected_units[unit_of_position[candidates]]
  return selected, unit_of_position


def _draw_unit_treatment(unit_of_position: np.ndarray,
                         rng: np.random.Generator) -> np.ndarray:
  """Draws per unit: 0 mask, 1 random token, 2 unchanged; int [n] per position.

  Special positions (unit -1) get a value too, which callers ignore.
  """
  num_units = int(unit_of_position.max(initial=-1)) + 1
  draws = rng.random(num_units)
  treatment = np.where(draws < _MASK_PROB, 0,
                       np.where(draws < _MASK_PROB + _RANDOM_PROB, 1, 2))
  return treatment[np.maximum(unit_of_position, 0)]


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, *,
                vocab_size: int, mask_rate: float, variant: str = "token",
                begins_word: np.ndarray | None = None,
                ends_word: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Builds a masked-LM example (BERT's 80/10/10 corruption).

  Args:
    ids: int32 [n], one piece such as `[BOS] chunk [EOS]`.
    rng: generator for this example.
    vocab_size: number of ids; random replacements are drawn uniformly from
      [NUM_RESERVED_IDS, vocab_size).
    mask_rate: expected share of the candidate tokens selected.
    variant: see `select_positions`.
    begins_word: see `select_positions`.
    ends_word: see `select_positions`.

  Returns:
    `input_ids` (corrupted), `original_ids`, `targets` (== original_ids),
    int32 [n], and `loss_weights`, float32 [n], 1 at the selected positions.
  """
  ids = np.asarray(ids, np.int32)
  selected, unit_of_position = select_positions(
      ids, rng, mask_rate=mask_rate, variant=variant, begins_word=begins_word,
      ends_word=ends_word)
  treatment = _draw_unit_treatment(unit_of_position, rng)
  inputs = ids.copy()
  inputs[selected & (treatment == 0)] = MASK_ID
  replace = selected & (treatment == 1)
  inputs[replace] = rng.integers(NUM_RESERVED_IDS, vocab_size,
                                 size=int(np.count_nonzero(replace)))
  return {
      "input_ids": inputs,
      "original_ids": ids,
      "targets": ids,
      "loss_weights": selected.astype(np.float32),
  }


def unigram_cdf(counts: np.ndarray) -> np.ndarray:
  """Turns token counts into the CDF that `replace_tokens` samples from.

  Args:
    counts: [vocab_size] counts of each id over the training data. Special ids
      get probability 0 whatever their count.

  Returns:
    float64 [vocab_size], non-decreasing, last value 1.
  """
  weights = np.asarray(counts, np.float64).copy()
  weights[:NUM_RESERVED_IDS] = 0.0
  total = weights.sum()
  if not total > 0:
    raise ValueError(
        "Cannot build a unigram distribution: the training data has no "
        "non-special tokens. Check config.data.train_files, or set "
        "config.rtd.replacements='random'.")
  return np.cumsum(weights) / total


def replace_tokens(ids: np.ndarray, rng: np.random.Generator, *,
                   vocab_size: int, mask_rate: float, variant: str = "token",
                   begins_word: np.ndarray | None = None,
                   ends_word: np.ndarray | None = None,
                   replacement_cdf: np.ndarray | None = None,
                   use_generator: bool = False) -> dict[str, np.ndarray]:
  """Builds a replaced-token-detection example (ELECTRA, Clark et al., 2020).

  Positions are selected as for mlm and every selected position gets a new
  token, never a special one: uniform over [NUM_RESERVED_IDS, vocab_size), or
  from `replacement_cdf`. A draw equal to the original token is labelled
  original. With `use_generator`, the selected positions hold MASK_ID instead
  and the train step samples their replacements from the generator.

  Args:
    ids: int32 [n], one piece such as `[BOS] chunk [EOS]`.
    rng: generator for this example.
    vocab_size: number of ids.
    mask_rate: expected share of the candidate tokens selected.
    variant: see `select_positions`.
    begins_word: see `select_positions`.
    ends_word: see `select_positions`.
    replacement_cdf: float64 [vocab_size] from `unigram_cdf`, or None for
      uniform replacements.
    use_generator: put MASK_ID at the selected positions.

  Returns:
    `input_ids`, `original_ids`, `targets` (1 where input_ids differs from
    original_ids, 0 elsewhere and at MASK_ID), int32 [n], and `loss_weights`,
    float32 [n], 1 at every non-special position of the original.
  """
  ids = np.asarray(ids, np.int32)
  selected, _ = select_positions(ids, rng, mask_rate=mask_rate,
                                 variant=variant, begins_word=begins_word,
                                 ends_word=ends_word)
  inputs = ids.copy()
  num_selected = int(np.count_nonzero(selected))
  if use_generator:
    inputs[selected] = MASK_ID
  elif replacement_cdf is None:
    inputs[selected] = rng.integers(NUM_RESERVED_IDS, vocab_size,
                                    size=num_selected)
  else:
    draws = np.searchsorted(replacement_cdf, rng.random(num_selected),
                            side="right")
    inputs[selected] = np.minimum(draws, vocab_size - 1)
  targets = (inputs != ids) & (inputs != MASK_ID)
  return {
      "input_ids": inputs,
      "original_ids": ids,
      "targets": targets.astype(np.int32),
      "loss_weights": (ids >= NUM_RESERVED_IDS).astype(np.float32),
  }


def permutation_rank(permutation: Sequence[int]) -> int:
  """Index of a permutation of 0..k-1 among all k! in lexicographic order.

  The identity has rank 0 and the reversal rank k! - 1 (Lehmer code).
  """
  permutation = list(permutation)
  k = len(permutation)
  rank = 0
  for i, value in enumerate(permutation):
    smaller_later = sum(1 for later in permutation[i + 1:] if later < value)
    rank += smaller_later * math.factorial(k - 1 - i)
  return rank


def permutation_from_rank(rank: int, k: int) -> tuple[int, ...]:
  """Inverse of `permutation_rank`."""
  if not 0 <= rank < math.factorial(k):
    raise ValueError(f"rank={rank} is outside [0, {k}!) for k={k}.")
  return next(itertools.islice(itertools.permutations(range(k)), rank, None))


def _split_long_sentences(boundaries: np.ndarray, *, budget: int,
                          part_len: int) -> np.ndarray:
  """Cuts every sentence longer than `budget` into parts of <= `part_len`."""
  lengths = np.diff(boundaries)
  if np.all(lengths <= budget):
    return boundaries
  result = [int(boundaries[0])]
  for start, end in zip(boundaries[:-1], boundaries[1:]):
    length = int(end - start)
    if length > budget:
      num_parts = -(-length // part_len)
      cuts = start + (np.arange(1, num_parts) * length) // num_parts
      result.extend(int(c) for c in cuts)
    result.append(int(end))
  return np.asarray(result, np.int64)


def _balanced_cuts(lengths: np.ndarray, num_segments: int) -> list[int]:
  """Splits sentences into `num_segments` non-empty runs of similar size.

  Args:
    lengths: int [w] token counts of consecutive sentences, w >= num_segments.
    num_segments: number of runs.

  Returns:
    Sentence indices `[0, c_1, ..., w]` where the runs start and end.
  """
  cumulative = np.concatenate([[0], np.cumsum(lengths)])
  total = cumulative[-1]
  num_sentences = len(lengths)
  cuts = [0]
  for segment in range(1, num_segments):
    ideal = segment * total / num_segments
    nearest = int(np.argmin(np.abs(cumulative - ideal)))
    # Leave at least one sentence for this run and for every later one.
    lowest = cuts[-1] + 1
    highest = num_sentences - (num_segments - segment)
    cuts.append(min(max(nearest, lowest), highest))
  cuts.append(num_sentences)
  return cuts


def sop_windows(sentence_ends: np.ndarray, *, seq_len: int,
                num_segments: int) -> tuple[list[np.ndarray], int]:
  """Groups a document's sentences into sop windows of k segments each.

  Windows take consecutive sentences greedily while their tokens fit the text
  budget `seq_len - (k + 1)` (BOS, k - 1 SEP and EOS take the rest). A window
  is split at sentence ends into k non-empty segments of similar token counts.
  A window with fewer than k sentences is not built: its first sentence is
  skipped and the next window starts after it. Segments end at sentence ends,
  except that a sentence longer than the whole budget is first cut into parts
  of at most `budget // k` tokens that count as sentences.

  Args:
    sentence_ends: int [m], exclusive end offsets of the sentences, strictly
      increasing.
    seq_len: example length, special tokens included.
    num_segments: k.

  Returns:
    `(windows, num_skipped_sentences)`: each window is int64 [k + 1], token
    offsets into the document where its segments start and end.
  """
  budget = seq_len - (num_segments + 1)
  if budget < num_segments:
    raise ValueError(
        f"seq_len={seq_len} is too short for {num_segments} sop segments: "
        f"each needs a token plus a BOS/SEP/EOS. Use seq_len >= "
        f"{2 * num_segments + 1} or fewer segments.")
  boundaries = np.concatenate([[0], np.asarray(sentence_ends, np.int64)])
  boundaries = _split_long_sentences(boundaries, budget=budget,
                                     part_len=budget // num_segments)
  num_sentences = len(boundaries) - 1
  windows = []
  skipped = 0
  first = 0
  while num_sentences - first >= num_segments:
    # The window is sentences [first, last): as many as fit the budget.
    last = int(np.searchsorted(boundaries, boundaries[first] + budget,
                               side="right")) - 1
    if last - first < num_segments:
      skipped += 1
      first += 1
      continue
    lengths = np.diff(boundaries[first:last + 1])
    cuts = _balanced_cuts(lengths, num_segments)
    windows.append(boundaries[first + np.asarray(cuts)])
    first = last
  return windows, skipped


def sop_example(ids: np.ndarray, segment_bounds: np.ndarray,
                rng: np.random.Generator, *,
                is_whitespace: np.ndarray | None = None
                ) -> dict[str, np.ndarray]:
  """Builds one sentence-order example from k consecutive segments.

  Args:
    ids: int32 [n], the document's tokens.
    segment_bounds: int [k + 1], offsets in `ids` where the segments start and
      end (a window from `sop_windows`).
    rng: generator for this example.
    is_whitespace: bool [vocab], True for pieces made only of whitespace.
      Such tokens at the start of a segment are dropped, because only
      segments that followed other text begin with whitespace, which would
      give the order away.

  Returns:
    A dict with
      input_ids: int32 [l], l = segment tokens + k + 1, the segments in
        permuted order.
      original_ids: int32 [l], the same segments in document order.
      targets, loss_weights: zeros, int32 and float32 [l].
      sop_permutation: int32 [k], for each segment in input order its index
        in the document.
      sop_segment_spans: int32 [k, 2], each segment's [start, end) in
        `input_ids`, in input order.
      sop_label: int32 scalar, the permutation's lexicographic rank.
  """
  num_segments = len(segment_bounds) - 1
  permutation = rng.permutation(num_segments)
  segments = []
  for segment in range(num_segments):
    text = np.asarray(ids[segment_bounds[segment]:segment_bounds[segment + 1]],
                      np.int32)
    if is_whitespace is not None:
      flags = is_whitespace[text]
      # The index of the first non-whitespace token; an all-whitespace
      # segment keeps its last token so that it never becomes empty.
      leading = len(text) - 1 if flags.all() else int(np.argmin(flags))
      text = text[leading:]
    segments.append(text)

  def join(order):
    parts = [np.asarray([BOS_ID], np.int32)]
    for position, segment in enumerate(order):
      parts.append(segments[segment])
      parts.append(np.asarray(
          [SEP_ID if position < num_segments - 1 else EOS_ID], np.int32))
    return np.concatenate(parts)

  tokens = join(permutation)
  spans = np.zeros((num_segments, 2), np.int32)
  offset = 1
  for position, segment in enumerate(permutation):
    spans[position] = (offset, offset + len(segments[segment]))
    offset += len(segments[segment]) + 1
  return {
      "input_ids": tokens,
      # The same segments in document order: undoing the permutation on
      # input_ids gives original_ids.
      "original_ids": join(range(num_segments)),
      "targets": np.zeros_like(tokens),
      "loss_weights": np.zeros(len(tokens), np.float32),
      "sop_permutation": permutation.astype(np.int32),
      "sop_segment_spans": spans,
      "sop_label": np.int32(permutation_rank(permutation)),
  }
