"""Tests of the per-example builders in mtl_lm.data.corruptions."""

import itertools
import math

import numpy as np
import pytest

from mtl_lm.data import corruptions
from mtl_lm.tokenizer import BOS_ID
from mtl_lm.tokenizer import EOS_ID
from mtl_lm.tokenizer import MASK_ID
from mtl_lm.tokenizer import NUM_RESERVED_IDS
from mtl_lm.tokenizer import PAD_ID
from mtl_lm.tokenizer import SEP_ID

_VOCAB_SIZE = 64


def _piece(num_tokens, *, seed=0, vocab_size=_VOCAB_SIZE, num_pad=0):
  """[BOS] random non-special ids [EOS] followed by `num_pad` PAD."""
  rng = np.random.default_rng(seed)
  body = rng.integers(NUM_RESERVED_IDS, vocab_size, num_tokens)
  return np.concatenate([[BOS_ID], body, [EOS_ID], [PAD_ID] * num_pad]).astype(
      np.int32)


# lm and encoder pieces.


def test_lm_pieces_hand_checked():
  ids = np.arange(10, 20, dtype=np.int32)  # Sentences [0, 3) [3, 7) [7, 10).
  pieces = corruptions.lm_pieces(ids, np.array([3, 7, 10]), seq_len=4)
  # Tokens: BOS 10 .. 19 EOS; the inputs are cut after the sentences.
  np.testing.assert_array_equal(pieces[0]["input_ids"], [BOS_ID, 10, 11, 12])
  np.testing.assert_array_equal(pieces[0]["targets"], [10, 11, 12, 13])
  np.testing.assert_array_equal(pieces[1]["input_ids"], [13, 14, 15, 16])
  np.testing.assert_array_equal(pieces[1]["targets"], [14, 15, 16, 17])
  np.testing.assert_array_equal(pieces[2]["input_ids"], [17, 18, 19])
  np.testing.assert_array_equal(pieces[2]["targets"], [18, 19, EOS_ID])
  assert len(pieces) == 3


def test_lm_pieces_lose_no_target():
  rng = np.random.default_rng(1)
  ids = rng.integers(NUM_RESERVED_IDS, 100, 500).astype(np.int32)
  sentence_ends = np.unique(np.concatenate(
      [rng.integers(1, 500, 30), [37, 38, 300], [500]]))
  pieces = corruptions.lm_pieces(ids, sentence_ends, seq_len=16)
  targets = np.concatenate([p["targets"] for p in pieces])
  inputs = np.concatenate([p["input_ids"] for p in pieces])
  np.testing.assert_array_equal(targets, np.concatenate([ids, [EOS_ID]]))
  np.testing.assert_array_equal(inputs, np.concatenate([[BOS_ID], ids]))
  for piece in pieces:
    assert len(piece["input_ids"]) <= 16
    assert piece["loss_weights"].dtype == np.float32
    np.testing.assert_array_equal(piece["input_ids"], piece["original_ids"])


def test_lm_pieces_cut_at_sentence_ends():
  ids = np.arange(6, 26, dtype=np.int32)
  sentence_ends = np.array([5, 9, 14, 20])
  pieces = corruptions.lm_pieces(ids, sentence_ends, seq_len=8)
  # Every piece but the last ends right after a sentence: its last target is
  # the first token of the next sentence.
  ends = np.cumsum([len(p["input_ids"]) for p in pieces])[:-1]
  for end in ends:
    assert end - 1 in sentence_ends, (end, sentence_ends)


def test_encoder_pieces_split_long_sentence():
  ids = np.arange(6, 30, dtype=np.int32)  # One sentence of 24 tokens.
  pieces = corruptions.encoder_pieces(ids, np.array([24]), seq_len=10)
  assert [len(p) for p in pieces] == [10, 10, 10]
  for piece in pieces:
    assert piece[0] == BOS_ID
    assert piece[-1] == EOS_ID
  np.testing.assert_array_equal(
      np.concatenate([p[1:-1] for p in pieces]), ids)


def test_encoder_pieces_cut_at_sentence_ends():
  ids = np.arange(6, 18, dtype=np.int32)
  pieces = corruptions.encoder_pieces(ids, np.array([3, 5, 9, 12]), seq_len=7)
  np.testing.assert_array_equal(pieces[0], [BOS_ID, 6, 7, 8, 9, 10, EOS_ID])
  np.testing.assert_array_equal(pieces[1], [BOS_ID, 11, 12, 13, 14, EOS_ID])
  np.testing.assert_array_equal(pieces[2], [BOS_ID, 15, 16, 17, EOS_ID])


# mlm.


def test_mask_tokens_hand_checked():
  ids = np.array([BOS_ID, 10, 11, 12, 13, EOS_ID, PAD_ID], np.int32)
  rng = np.random.default_rng(0)
  result = corruptions.mask_tokens(ids, rng, vocab_size=_VOCAB_SIZE,
                                   mask_rate=0.5)
  # Replay the documented draws: stochastic rounding of 0.5 * 4 = 2, a
  # permutation of the 4 units, then one uniform per unit for its treatment.
  replay = np.random.default_rng(0)
  replay.random()  # The rounding draw; 2.0 has no fraction to round.
  order = replay.permutation(4)
  chosen = np.sort(order[:2]) + 1  # Units 0..3 are positions 1..4.
  treatment = replay.random(4)
  expected_weights = np.zeros(7, np.float32)
  expected_weights[chosen] = 1.0
  np.testing.assert_array_equal(result["loss_weights"], expected_weights)
  for position in chosen:
    draw = treatment[position - 1]
    if draw < 0.8:
      assert result["input_ids"][position] == MASK_ID
    elif draw < 0.9:
      assert result["input_ids"][position] >= NUM_RESERVED_IDS
    else:
      assert result["input_ids"][position] == ids[position]
  unselected = np.setdiff1d(np.arange(7), chosen)
  np.testing.assert_array_equal(result["input_ids"][unselected],
                                ids[unselected])
  np.testing.assert_array_equal(result["targets"], ids)
  np.testing.assert_array_equal(result["original_ids"], ids)


def test_mask_tokens_rates():
  rng = np.random.default_rng(3)
  num_candidates = num_selected = num_masked = num_random = num_kept = 0
  for seed in range(400):
    ids = _piece(int(rng.integers(5, 120)), seed=seed, num_pad=3)
    result = corruptions.mask_tokens(ids, rng, vocab_size=_VOCAB_SIZE,
                                     mask_rate=0.15)
    selected = result["loss_weights"] > 0
    changed = result["input_ids"] != ids
    num_candidates += int(np.count_nonzero(ids >= NUM_RESERVED_IDS))
    num_selected += int(np.count_nonzero(selected))
    num_masked += int(np.count_nonzero(result["input_ids"] == MASK_ID))
    # A random draw that equals the original counts as kept here.
    num_random += int(np.count_nonzero(selected & changed &
                                       (result["input_ids"] != MASK_ID)))
    num_kept += int(np.count_nonzero(selected & ~changed))
    assert not np.any(changed & ~selected)
  assert abs(num_selected / num_candidates - 0.15) < 0.01
  assert abs(num_masked / num_selected - 0.8) < 0.02
  # 1/58 of the random draws equal the original, which moves 0.2 points of
  # the selected positions from random to kept: well within 2 points.
  assert abs(num_random / num_selected - 0.1) < 0.02
  assert abs(num_kept / num_selected - 0.1) < 0.02


@pytest.mark.parametrize("variant", ["token", "whole_word", "span"])
def test_mask_tokens_never_selects_specials(variant):
  pieces = ["<pad>", "<unk>", "<s>", "</s>", "<mask>", "<sep>"]
  pieces += [("\u2581w" if i % 3 == 0 else "x") + str(i) for i in range(58)]
  begins, ends = corruptions.word_boundary_tables(pieces)
  rng = np.random.default_rng(4)
  for seed in range(50):
    ids = _piece(40, seed=seed, num_pad=5)
    ids[10] = SEP_ID
    ids[20] = MASK_ID
    result = corruptions.mask_tokens(
        ids, rng, vocab_size=_VOCAB_SIZE, mask_rate=0.5, variant=variant,
        begins_word=begins, ends_word=ends)
    special = ids < NUM_RESERVED_IDS
    assert not np.any(result["loss_weights"][special])
    np.testing.assert_array_equal(result["input_ids"][special], ids[special])
    replaced = (result["input_ids"] != ids) & (result["input_ids"] != MASK_ID)
    assert np.all(result["input_ids"][replaced] >= NUM_RESERVED_IDS)


def test_whole_word_masks_every_piece_of_a_word():
  pieces = ["<pad>", "<unk>", "<s>", "</s>", "<mask>", "<sep>",
            "\u2581un", "believ", "able", "\u2581cat", "\u2581dog", "s"]
  begins, ends = corruptions.word_boundary_tables(pieces)
  # Words: [6 7 8] [9] [10 11] [6 7 8].
  ids = np.array([BOS_ID, 6, 7, 8, 9, 10, 11, 6, 7, 8, EOS_ID], np.int32)
  words = [[1, 2, 3], [4], [5, 6], [7, 8, 9]]
  rng = np.random.default_rng(5)
  for _ in range(200):
    result = corruptions.mask_tokens(
        ids, rng, vocab_size=12, mask_rate=0.3, variant="whole_word",
        begins_word=begins, ends_word=ends)
    weights = result["loss_weights"]
    for word in words:
      assert len(set(weights[word].tolist())) == 1, (weights, word)


def test_word_boundary_tables_chinese_and_bytes():
  pieces = ["<pad>", "<unk>", "<s>", "</s>", "<mask>", "<sep>",
            "\u2581the", "re", "\u5b9d\u7389", "\u9edb", "\u3002", "<0xE4>",
            "<0xB8>", "<0x0A>", ",", "\u2581"]
  begins, ends = corruptions.word_boundary_tables(pieces)
  np.testing.assert_array_equal(
      begins[6:],
      [True, False, True, True, True, True, False, True, True, True])
  np.testing.assert_array_equal(
      ends[6:],
      [False, False, True, True, True, False, False, True, True, True])
  # In Chinese text with no spaces, each piece is a word.
  ids = np.array([8, 9, 10, 8], np.int32)
  unit_of_position, num_units = corruptions._unit_ids(
      ids, begins_word=begins, ends_word=ends)
  np.testing.assert_array_equal(unit_of_position, [0, 1, 2, 3])
  assert num_units == 4
  # "there" after a newline byte: "▁the" "re" is one word.
  ids = np.array([13, 6, 7, 14], np.int32)
  unit_of_position, _ = corruptions._unit_ids(
      ids, begins_word=begins, ends_word=ends)
  np.testing.assert_array_equal(unit_of_position, [0, 1, 1, 2])


def test_span_rate_and_contiguity():
  rng = np.random.default_rng(6)
  num_candidates = num_selected = 0
  num_runs = 0
  for seed in range(300):
    ids = _piece(100, seed=seed)
    selected, _ = corruptions.select_positions(ids, rng, mask_rate=0.15,
                                               variant="span")
    num_candidates += 100
    num_selected += int(np.count_nonzero(selected))
    num_runs += int(np.count_nonzero(np.diff(selected.astype(int)) == 1))
  assert abs(num_selected / num_candidates - 0.15) < 0.02
  # Geometric(0.2) spans clipped at 10 average 4.5 tokens before trimming to
  # the budget, so runs are much longer than single tokens.
  assert num_selected / num_runs > 2.0


def test_select_positions_rejects_unknown_variant():
  with pytest.raises(ValueError, match="mlm variant 'bogus'"):
    corruptions.select_positions(_piece(5), np.random.default_rng(0),
                                 mask_rate=0.1, variant="bogus")


# rtd.


def test_replace_tokens_labels_equal_draws_as_original():
  # With 7 ids only id 6 is non-special, so every replacement equals 6.
  ids = np.array([BOS_ID, 6, 6, 6, 6, 6, 6, EOS_ID, PAD_ID], np.int32)
  rng = np.random.default_rng(7)
  result = corruptions.replace_tokens(ids, rng, vocab_size=7, mask_rate=0.5)
  np.testing.assert_array_equal(result["input_ids"], ids)
  np.testing.assert_array_equal(result["targets"], np.zeros(9))
  np.testing.assert_array_equal(result["loss_weights"],
                                [0, 1, 1, 1, 1, 1, 1, 0, 0])


def test_replace_tokens_targets_equal_changes():
  rng = np.random.default_rng(8)
  num_replaced = num_candidates = 0
  for seed in range(200):
    ids = _piece(30, seed=seed, vocab_size=7, num_pad=2)
    result = corruptions.replace_tokens(ids, rng, vocab_size=9,
                                        mask_rate=0.15)
    changed = result["input_ids"] != ids
    np.testing.assert_array_equal(result["targets"], changed.astype(np.int32))
    special = ids < NUM_RESERVED_IDS
    np.testing.assert_array_equal(result["input_ids"][special], ids[special])
    assert np.all(result["input_ids"][changed] >= NUM_RESERVED_IDS)
    num_replaced += int(np.count_nonzero(changed))
    num_candidates += 30
  # 15% selected, and 2 of the 3 non-special ids differ from the original.
  assert abs(num_replaced / num_candidates - 0.15 * 2 / 3) < 0.02


def test_replace_tokens_unigram_draws_follow_counts():
  counts = np.zeros(10)
  counts[:NUM_RESERVED_IDS] = 1000  # Specials never drawn, whatever counts.
  counts[7] = 1
  counts[9] = 3
  cdf = corruptions.unigram_cdf(counts)
  rng = np.random.default_rng(9)
  ids = np.array([BOS_ID] + [6] * 200 + [EOS_ID], np.int32)
  drawn = []
  for _ in range(50):
    result = corruptions.replace_tokens(ids, rng, vocab_size=10,
                                        mask_rate=0.5, replacement_cdf=cdf)
    drawn.append(result["input_ids"][result["targets"] == 1])
  drawn = np.concatenate(drawn)
  assert set(np.unique(drawn).tolist()) == {7, 9}
  assert abs(np.mean(drawn == 9) - 0.75) < 0.03


def test_replace_tokens_generator_mode():
  ids = _piece(50, seed=10)
  result = corruptions.replace_tokens(ids, np.random.default_rng(10),
                                      vocab_size=_VOCAB_SIZE, mask_rate=0.2,
                                      use_generator=True)
  masked = result["input_ids"] == MASK_ID
  assert np.count_nonzero(masked) == 10  # 0.2 of the 50 candidates.
  np.testing.assert_array_equal(result["input_ids"][~masked], ids[~masked])
  np.testing.assert_array_equal(result["targets"], np.zeros(52))
  assert result["loss_weights"].sum() == 50


def test_unigram_cdf_rejects_only_specials():
  with pytest.raises(ValueError, match="no non-special tokens"):
    corruptions.unigram_cdf(np.ones(NUM_RESERVED_IDS))


# sop.


def test_permutation_rank_k3_table():
  expected = list(itertools.permutations(range(3)))
  assert expected == [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1),
                      (2, 1, 0)]
  for rank, permutation in enumerate(expected):
    assert corruptions.permutation_rank(permutation) == rank
    assert corruptions.permutation_from_rank(rank, 3) == permutation


def test_permutation_rank_matches_itertools_k4():
  for rank, permutation in enumerate(itertools.permutations(range(4))):
    assert corruptions.permutation_rank(permutation) == rank
  assert math.factorial(4) == rank + 1


def test_sop_example_undo_permutation():
  ids = np.arange(6, 26, dtype=np.int32)
  bounds = np.array([0, 4, 9, 15])
  rng = np.random.default_rng(11)
  labels = set()
  for _ in range(60):
    example = corruptions.sop_example(ids, bounds, rng)
    permutation = example["sop_permutation"]
    spans = example["sop_segment_spans"]
    inputs = example["input_ids"]
    assert inputs[0] == BOS_ID
    assert inputs[-1] == EOS_ID
    assert list(inputs).count(SEP_ID) == 2
    assert len(inputs) == 15 + 4
    # Segment i of the input is original segment permutation[i].
    segments = [inputs[start:end] for start, end in spans]
    for segment, original in zip(segments, permutation):
      np.testing.assert_array_equal(
          segment, ids[bounds[original]:bounds[original + 1]])
    restored = np.concatenate([segments[i] for i in np.argsort(permutation)])
    np.testing.assert_array_equal(restored, ids[:15])
    assert example["sop_label"] == corruptions.permutation_rank(permutation)
    labels.add(int(example["sop_label"]))
    np.testing.assert_array_equal(example["loss_weights"], 0)
    np.testing.assert_array_equal(example["targets"], 0)
  assert labels == set(range(6))


def test_sop_windows_hand_checked():
  # Sentences of 3, 4, 3, 10, 2, 1 tokens; budget 12 - 3 = 9. The 10-token
  # sentence exceeds the budget and is cut into parts of 4, 3, 3 tokens
  # (at most 9 // 2 = 4).
  windows, skipped = corruptions.sop_windows(
      np.array([3, 7, 10, 20, 22, 23]), seq_len=12, num_segments=2)
  np.testing.assert_array_equal(windows[0], [0, 3, 7])
  np.testing.assert_array_equal(windows[1], [7, 10, 16])
  np.testing.assert_array_equal(windows[2], [16, 20, 23])
  assert len(windows) == 3
  assert skipped == 0


def test_sop_windows_skip_sentence_without_partner():
  # Budget 7: the 6-token sentence leaves no room for a second one.
  windows, skipped = corruptions.sop_windows(
      np.array([6, 8, 10]), seq_len=10, num_segments=2)
  assert skipped == 1
  np.testing.assert_array_equal(windows[0], [6, 8, 10])
  assert len(windows) == 1


def test_sop_windows_short_document():
  windows, skipped = corruptions.sop_windows(np.array([5, 9]), seq_len=64,
                                             num_segments=3)
  assert not windows
  assert skipped == 0


def test_sop_windows_rejects_tiny_seq_len():
  with pytest.raises(ValueError, match="seq_len=6 is too short"):
    corruptions.sop_windows(np.array([5, 9]), seq_len=6, num_segments=3)


def test_sop_windows_segments_end_at_sentence_ends():
  rng = np.random.default_rng(12)
  lengths = rng.integers(1, 15, 200)
  sentence_ends = np.cumsum(lengths)
  windows, _ = corruptions.sop_windows(sentence_ends, seq_len=48,
                                       num_segments=3)
  allowed = set(sentence_ends.tolist()) | {0}
  for window in windows:
    assert len(window) == 4
    assert np.all(np.diff(window) > 0)
    assert window[-1] - window[0] <= 48 - 4
    assert set(window.tolist()) <= allowed
  # Consecutive windows leave no sentence out (every sentence fits).
  for previous, following in zip(windows, windows[1:]):
    assert previous[-1] == following[0]
