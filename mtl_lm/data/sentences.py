"""Sentence splitting for English and Chinese, and sentence-aware tokenization.

`split_sentences` cuts a document into sentences without losing a character:
`"".join(split_sentences(text)) == text`. Whitespace between two sentences
starts the second one, because the tokenizer attaches a space to the word
after it (the "▁" prefix of its piece). Encoding sentence by sentence thus
gives the pieces of whole-text encoding, except where a piece would span a
boundary.

A sentence ends after a run of terminators (`.`, `!`, `?`, `…`, `。`, `！`,
`？`, `｡`) together with any closing quotes and brackets right after it, e.g.
`好。”` or `(see above.)`, and at every blank line. Rules for the run:

* A run containing `。`, `！`, `？` or `｡` always ends a sentence, because
  Chinese puts no space after it.
* Otherwise (`.`, `!`, `?`, `…`), the run must be followed by whitespace and
  then by something other than a lowercase letter (opening quotes and brackets
  are skipped before looking). `!` and `?` also end a sentence when a CJK
  character follows directly, as in Chinese text typed with ASCII marks.
* A lone `.` does not end a sentence after a known abbreviation (`Mr.`,
  `vs.`, but not `etc.`), a single letter (`J. Smith`), a word with an inner
  dot (`U.S.`, `e.g.`), or a list number at the start of a line (`1. First`).
* `…` and `……` followed directly by more text are a pause, not an end.

Limits: a sentence may also end after an abbreviation that the list lacks, or
not end after one that the list has ("I saw Dr. No. Then..."), and text with
no terminators and no blank lines, such as code, stays one sentence however
long it is.
"""

import re

import numpy as np

_CJK_TERMINATORS = "。！？｡"
_TERMINATORS = ".!?…" + _CJK_TERMINATORS
_CLOSERS = "\"'”’」』)）]》】〉»›"
_OPENERS = "\"'“‘「『(（[《【〈«‹"

# A run of terminators with the closing quotes and brackets that follow it.
_TERMINATOR_RUN = re.compile(
    f"[{re.escape(_TERMINATORS)}]+[{re.escape(_CLOSERS)}]*")
# A whitespace run that contains a blank line, from the run's first character
# on (the lookbehind keeps matches from starting inside the run).
_PARAGRAPH_BREAK = re.compile(r"(?<!\s)\s*\n[^\S\n]*\n")
# The word right before a period, after any opening quotes or brackets.
_WORD_BEFORE = re.compile(f"[{re.escape(_OPENERS)}]*(\\S*)$")
# A list number alone at the start of its line, e.g. "  12".
_LIST_NUMBER = re.compile(r"[^\S\n]*\d{1,3}")
# Characters before a period that the abbreviation rules look at; longer
# words are no abbreviations. Bounded so that splitting stays linear in the
# length of the text.
_LOOKBEHIND_CHARS = 32

# Lowercase, without the final period. "etc." is left out on purpose because
# it usually ends the sentence it is in.
_ABBREVIATIONS = frozenset("""
    mr mrs ms dr prof sr jr st mt vs cf al fig figs eq eqs no nos vol vols
    pp ch sec approx dept est inc ltd co corp jan feb mar apr jun jul aug
    sep sept oct nov dec
""".split())


def _is_cjk(char: str) -> bool:
  code = ord(char)
  return (0x3040 <= code <= 0x30FF or  # Hiragana and Katakana.
          0x3400 <= code <= 0x4DBF or  # CJK Extension A.
          0x4E00 <= code <= 0x9FFF or  # CJK Unified Ideographs.
          0xAC00 <= code <= 0xD7AF or  # Hangul syllables.
          0xF900 <= code <= 0xFAFF or  # CJK Compatibility Ideographs.
          0x20000 <= code <= 0x3FFFF)  # CJK Extensions B and later.


def _skip_openers(text: str, position: int) -> int:
  while position < len(text) and text[position] in _OPENERS:
    position += 1
  return position


def _is_abbreviation_period(text: str, period: int) -> bool:
  """Whether the `.` at `period` closes an abbreviation, initial or list number."""
  window_start = max(0, period - _LOOKBEHIND_CHARS)
  word = _WORD_BEFORE.search(text, window_start, period).group(1)
  if not word:
    return False
  if len(word) == 1 and word.isalpha():
    return True
  if "." in word or word.lower() in _ABBREVIATIONS:
    return True
  line_start = text.rfind("\n", window_start, period) + 1
  if line_start == 0 and window_start > 0:
    return False  # The line starts before the window: too long for a number.
  return _LIST_NUMBER.fullmatch(text, line_start, period) is not None


def _ends_sentence(text: str, run: re.Match[str]) -> bool:
  """Whether the terminator run `run` ends a sentence (see the module doc)."""
  end = run.end()
  if end == len(text):
    return True
  terminators = run.group().rstrip(_CLOSERS)
  if any(char in _CJK_TERMINATORS for char in terminators):
    return True

  if not text[end].isspace():
    position = _skip_openers(text, end)
    next_is_cjk = position < len(text) and _is_cjk(text[position])
    return next_is_cjk and ("!" in terminators or "?" in terminators)

  position = end
  while position < len(text) and text[position].isspace():
    position += 1
  position = _skip_openers(text, position)
  if position < len(text) and text[position].islower():
    return False
  if terminators == ".":
    return not _is_abbreviation_period(text, run.start())
  return True


def split_sentences(text: str) -> list[str]:
  """Splits text into sentences whose concatenation is `text`.

  Args:
    text: a document in English, Chinese or both.

  Returns:
    Non-empty strings with `"".join(result) == text`; [] for "". Whitespace
    between sentences starts the following sentence, and whitespace at the
    end of the text stays with the last sentence.
  """
  boundaries = set()
  for run in _TERMINATOR_RUN.finditer(text):
    if _ends_sentence(text, run):
      boundaries.add(run.end())
  for paragraph_break in _PARAGRAPH_BREAK.finditer(text):
    boundaries.add(paragraph_break.start())

  sentences = []
  start = 0
  for boundary in sorted(boundaries) + [len(text)]:
    if boundary <= start:
      continue
    piece = text[start:boundary]
    start = boundary
    # Whitespace alone is no sentence: it joins the sentence before it, or
    # the one after it at the start of the text.
    if piece.isspace() and sentences:
      sentences[-1] += piece
    elif sentences and sentences[-1].isspace():
      sentences[-1] += piece
    else:
      sentences.append(piece)
  return sentences


def tokenize_document(tokenizer, text: str) -> dict[str, np.ndarray]:
  """Encodes a document sentence by sentence.

  Args:
    tokenizer: anything with `encode(str) -> list[int]`, normally a
      `mtl_lm.tokenizer.Tokenizer`.
    text: the document.

  Returns:
    A dict with
      ids: int32 `[num_tokens]`, the sentences' ids concatenated, without BOS
        or EOS.
      sentence_ends: int32 `[num_sentences]`, the exclusive end offset of each
        sentence in `ids`: strictly increasing, the last equal to num_tokens.
        Sentences that encode to no ids are left out.
    Both arrays are empty when the text encodes to nothing.
  """
  ids = []
  sentence_ends = []
  for sentence in split_sentences(text):
    # The whitespace before a sentence is encoded on its own, so it never
    # merges into the first word's piece. Sentence-order examples drop it,
    # because it would show which segments followed other text.
    body = sentence.lstrip()
    leading = sentence[:len(sentence) - len(body)]
    sentence_ids = tokenizer.encode(leading) if leading else []
    sentence_ids = sentence_ids + tokenizer.encode(body)
    if sentence_ids:
      ids.extend(sentence_ids)
      sentence_ends.append(len(ids))
  return {
      "ids": np.asarray(ids, dtype=np.int32),
      "sentence_ends": np.asarray(sentence_ends, dtype=np.int32),
  }
