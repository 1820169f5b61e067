"""Tests of sentence splitting and sentence-aware tokenization."""

import time

import numpy as np
import pytest

from mtl_lm.data import sentences


@pytest.mark.parametrize("text, expected", [
    # English basics; whitespace starts the next sentence.
    ("Hello world. How are you? Fine!",
     ["Hello world.", " How are you?", " Fine!"]),
    ("Two spaces.  Then more.", ["Two spaces.", "  Then more."]),
    # Chinese: no space after the terminator.
    ("今天下雨。我们回家吧！好吗？", ["今天下雨。", "我们回家吧！", "好吗？"]),
    # A closing quote stays with its sentence.
    ("他说：“好。”然后走了。", ["他说：“好。”", "然后走了。"]),
    ("「走吧。」她说。", ["「走吧。」", "她说。"]),
    ('He said "Stop." Then he left.', ['He said "Stop."', " Then he left."]),
    ("(See above.) Next.", ["(See above.)", " Next."]),
    ("他笑了（真的。）我也笑了。", ["他笑了（真的。）", "我也笑了。"]),
    # Runs of terminators are one boundary.
    ("真的吗？！我不信。", ["真的吗？！", "我不信。"]),
    ("Really?! Yes.", ["Really?!", " Yes."]),
    # Ellipses: a pause before more text or a lowercase word, else an end.
    ("我……不知道。", ["我……不知道。"]),
    ("Wait... what? He left... Then she came.",
     ["Wait... what?", " He left...", " Then she came."]),
    ("Wait… then go. Stop…", ["Wait… then go.", " Stop…"]),
    # Decimals, inner dots and abbreviations do not end sentences.
    ("Pi is 3.14 today. See example.com now.",
     ["Pi is 3.14 today.", " See example.com now."]),
    ("Mr. Smith met Dr. Jones. They spoke.",
     ["Mr. Smith met Dr. Jones.", " They spoke."]),
    ("Use e.g. Python. Or i.e. C.", ["Use e.g. Python.", " Or i.e. C."]),
    ("J. R. R. Tolkien wrote it. Done.",
     ["J. R. R. Tolkien wrote it.", " Done."]),
    ("Apples, pears, etc. Then more.", ["Apples, pears, etc.", " Then more."]),
    # A lowercase word after the period continues the sentence.
    ("It costs 5 dollars vs. 6 here. ok.", ["It costs 5 dollars vs. 6 here. ok."]),
    # List numbers at the start of a line.
    ("Steps:\n1. Open it.\n2. Read it.", ["Steps:\n1. Open it.", "\n2. Read it."]),
    # Newlines: a terminator before a newline ends; a blank line always ends.
    ("One.\nTwo.", ["One.", "\nTwo."]),
    ("Heading\n\nBody text", ["Heading", "\n\nBody text"]),
    ("a  \n \t\n  b", ["a", "  \n \t\n  b"]),
    ("a \n b \n c", ["a \n b \n c"]),
    ("no stop\nstill same", ["no stop\nstill same"]),
    # ASCII ! and ? before Chinese text.
    ("好!你呢?我很好.", ["好!", "你呢?", "我很好."]),
    # Whitespace at the ends stays with the first or last sentence.
    ("  Lead. Trail.  ", ["  Lead.", " Trail.  "]),
    ("Done.\n\n", ["Done.\n\n"]),
    ("   ", ["   "]),
    ("", []),
])
def test_split_sentences_cases(text, expected):
  assert sentences.split_sentences(text) == expected


def test_split_sentences_join_identity_random():
  rng = np.random.default_rng(0)
  alphabet = list("ab Z.!?…。！？”」)）\"' \n\n\t3好说") + ["Mr", "e.g", "1"]
  for _ in range(300):
    text = "".join(rng.choice(alphabet, size=rng.integers(0, 40)))
    split = sentences.split_sentences(text)
    assert "".join(split) == text
    assert all(split)
    if len(split) > 1:
      assert not any(piece.isspace() for piece in split)


def test_split_sentences_linear_time():
  # 200,000 characters in one line with 50,000 periods. Looking at the whole
  # prefix before each period would take minutes.
  text = "Ab. " * 50_000
  start = time.perf_counter()
  split = sentences.split_sentences(text)
  elapsed = time.perf_counter() - start
  assert len(split) == 50_000
  assert elapsed < 5.0


class _CharTokenizer:
  """Encodes each non-space character as its code point; spaces vanish."""

  def encode(self, text):
    return [ord(char) for char in text if char != " "]


def test_tokenize_document_offsets():
  tokenized = sentences.tokenize_document(_CharTokenizer(), "Ab. Cd!好。")
  # Sentences "Ab.", " Cd!", "好。" encode to 3, 3 and 2 ids.
  np.testing.assert_array_equal(tokenized["sentence_ends"], [3, 6, 8])
  np.testing.assert_array_equal(
      tokenized["ids"], [ord(c) for c in "Ab.Cd!好。"])
  assert tokenized["ids"].dtype == np.int32
  assert tokenized["sentence_ends"].dtype == np.int32


class _LetterTokenizer:
  """Encodes letters only, so a sentence without letters encodes to []."""

  def encode(self, text):
    return [ord(char) for char in text if char.isalpha()]


def test_tokenize_document_drops_empty_sentences():
  tokenized = sentences.tokenize_document(_LetterTokenizer(), "Hi. 42! Yo.")
  np.testing.assert_array_equal(tokenized["ids"], [ord(c) for c in "HiYo"])
  np.testing.assert_array_equal(tokenized["sentence_ends"], [2, 4])


def test_tokenize_document_whitespace_only():
  tokenized = sentences.tokenize_document(_CharTokenizer(), "   ")
  assert tokenized["ids"].shape == (0,)
  assert tokenized["sentence_ends"].shape == (0,)
  assert tokenized["sentence_ends"].dtype == np.int32


def test_tokenize_document_empty_text():
  tokenized = sentences.tokenize_document(_CharTokenizer(), "")
  assert tokenized["ids"].shape == (0,)
  assert tokenized["ids"].dtype == np.int32
  assert tokenized["sentence_ends"].shape == (0,)


def test_tokenize_document_ends_strictly_increase():
  text = "First one. Second!  Third?\n\nFourth 3.14 ok. 第五。第六！"
  tokenized = sentences.tokenize_document(_CharTokenizer(), text)
  ends = tokenized["sentence_ends"]
  assert np.all(np.diff(ends) > 0)
  assert ends[-1] == len(tokenized["ids"])
  assert len(ends) == len(sentences.split_sentences(text))
