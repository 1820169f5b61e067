"""SentencePiece tokenizer with the special ids shared by every mtl_lm model.

Ids 0..5 are reserved, and every id below `NUM_RESERVED_IDS` is special:

  0 `<pad>`   padding; `Tokenizer.decode` skips it.
  1 `<unk>`   unknown piece; byte fallback makes it rare.
  2 `<s>`     beginning of sequence.
  3 `</s>`    end of sequence.
  4 `<mask>`  masked-LM and replaced-token-detection mask.
  5 `<sep>`   segment separator.

`<mask>` and `<sep>` are SentencePiece control symbols, so the literal text
"<mask>" encodes to ordinary pieces and never to `MASK_ID`.

Training choices, fixed for every model that `train_tokenizer` writes:

* BPE, as in the Llama family, and because SentencePiece's BPE trainer is about
  ten times faster than its unigram trainer on a few MB of text.
* `normalization_rule_name="identity"`, no dummy prefix and no whitespace
  collapsing, so that `decode(encode(text)) == text` for every string. NFKC
  would rewrite full-width Chinese punctuation (！？，) into ASCII and break
  that round trip. `mtl_lm.data.sentences` encodes sentences one at a time
  and concatenates them. Without a dummy prefix no "▁" is added at the start
  of each sentence, so the ids differ from whole-text encoding only where a
  piece would have spanned a sentence boundary.
* `byte_fallback=True`: characters outside the vocabulary, newlines and tabs
  become their UTF-8 bytes (`<0x0A>`), so rare Chinese characters round trip.
* `character_coverage=0.9995`, the value SentencePiece recommends for
  languages with large character sets such as Chinese. When the characters
  it covers do not fit in the pieces left after the reserved and byte pieces
  (Chinese text with a small vocabulary), the coverage is lowered, at most
  to SentencePiece's minimum of 0.98. The characters left out are spelled
  with byte pieces.
* `split_digits=True`, as in Llama 1 and 2: numbers are spelled digit by digit.
"""

import collections
import hashlib
import io
import os
import re
from typing import Iterable, Iterator, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
MASK_ID = 4
SEP_ID = 5
NUM_RESERVED_IDS = 6

MASK_PIECE = "<mask>"
SEP_PIECE = "<sep>"
RESERVED_PIECES = ("<pad>", "<unk>", "<s>", "</s>", MASK_PIECE, SEP_PIECE)

# Cap on the text that `load_or_train_tokenizer` feeds to the trainer. A few
# MB give a stable vocabulary of a few thousand pieces in seconds.
DEFAULT_MAX_TRAINING_CHARS = 4_000_000

# SentencePiece skips training sentences longer than `max_sentence_length`
# bytes (default 4192). Lines are cut into chunks of at most this many
# characters, which is at most 4 * 1000 bytes in UTF-8.
_MAX_TRAINING_LINE_CHARS = 1000

_RETRAIN_HINT = (
    "Train a compatible model with `python launch/train_tokenizer.py "
    "--config=CONFIG --output=PATH`, or leave --config.data.tokenizer empty "
    "to train one in the workdir.")


class Tokenizer:
  """SentencePiece model with mtl_lm's reserved ids; picklable.

  Only the serialized model proto is pickled; each process rebuilds its
  `SentencePieceProcessor` on first use, so Grain can send the tokenizer to
  worker processes.
  """

  def __init__(self, model_proto: bytes, *, name: str = "<memory>"):
    """Wraps a serialized SentencePiece model.

    Args:
      model_proto: serialized `ModelProto` bytes, e.g. a `.model` file's
        contents.
      name: where the model came from, used in error messages.

    Raises:
      ValueError: if the bytes are not a SentencePiece model or its ids
        0..5 are not `RESERVED_PIECES`.
    """
    self._model_proto = bytes(model_proto)
    self._name = name
    self._processor = None
    _check_reserved_pieces(self._get_processor(), name)

  @classmethod
  def from_file(cls, path: str) -> "Tokenizer":
    """Loads a `.model` file written by SentencePiece.

    Raises:
      ValueError: if the file is missing, is not a SentencePiece model, or
        its reserved ids differ from `RESERVED_PIECES`.
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
      raise ValueError(
          f"Tokenizer model {path!r} not found. Pass an existing SentencePiece "
          f"model file. {_RETRAIN_HINT}")
    with open(path, "rb") as f:
      return cls(f.read(), name=path)

  def save(self, path: str) -> None:
    """Writes the model proto to `path` atomically (via a temporary file)."""
    _write_bytes_atomically(path, self._model_proto)

  @property
  def model_proto(self) -> bytes:
    """Serialized SentencePiece `ModelProto`."""
    return self._model_proto

  @property
  def fingerprint(self) -> str:
    """First 16 hex digits of the SHA-256 of the model proto.

    Stored in pre-tokenized records so that reading them with another
    tokenizer is detected.
    """
    return hashlib.sha256(self._model_proto).hexdigest()[:16]

  @property
  def vocab_size(self) -> int:
    """Number of ids, reserved and byte pieces included."""
    return self._get_processor().get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Encodes text to ids, without BOS or EOS."""
    return self._get_processor().encode(text, out_type=int)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes ids to text; PAD_ID is skipped and other specials decode to ""."""
    ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)
           if i != PAD_ID]
    return self._get_processor().decode(ids)

  def id_to_piece(self, token_id: int) -> str:
    return self._get_processor().id_to_piece(int(token_id))

  def is_special(self, ids: np.ndarray) -> np.ndarray:
    """Returns a bool array, True where an id is below NUM_RESERVED_IDS.

    Args:
      ids: integer array of any shape.

    Returns:
      bool array of the same shape.
    """
    return np.asarray(ids) < NUM_RESERVED_IDS

  def _get_processor(self) -> spm.SentencePieceProcessor:
    if self._processor is None:
      processor = spm.SentencePieceProcessor()
      try:
        processor.LoadFromSerializedProto(self._model_proto)
      except (RuntimeError, OSError) as e:
        raise ValueError(
            f"{self._name!r} is not a valid SentencePiece model ({e}). "
            f"{_RETRAIN_HINT}") from e
      self._processor = processor
    return self._processor

  def __getstate__(self):
    return {"model_proto": self._model_proto, "name": self._name}

  def __setstate__(self, state):
    self._model_proto = state["model_proto"]
    self._name = state["name"]
    self._processor = None

  def __repr__(self) -> str:
    return f"Tokenizer({self._name!r}, vocab_size={self.vocab_size})"


def _check_reserved_pieces(processor: spm.SentencePieceProcessor,
                           name: str) -> None:
  """Raises ValueError unless ids 0..5 are RESERVED_PIECES of the right type."""
  size = processor.get_piece_size()
  found = tuple(processor.id_to_piece(i)
                for i in range(min(size, NUM_RESERVED_IDS)))
  kinds_ok = (
      size > NUM_RESERVED_IDS and processor.is_unknown(UNK_ID) and
      all(processor.is_control(i)
          for i in (PAD_ID, BOS_ID, EOS_ID, MASK_ID, SEP_ID)))
  if found != RESERVED_PIECES or not kinds_ok:
    raise ValueError(
        f"Tokenizer {name!r} has pieces {found} at ids 0..{len(found) - 1}, "
        f"but mtl_lm needs {RESERVED_PIECES} there (<unk> as the unknown "
        f"piece, the others as control symbols). {_RETRAIN_HINT}")


def _training_lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  """Yields non-blank lines of at most _MAX_TRAINING_LINE_CHARS characters."""
  total = 0
  for text in texts:
    for line in text.splitlines():
      if not line.strip():
        continue
      for start in range(0, len(line), _MAX_TRAINING_LINE_CHARS):
        chunk = line[start:start + _MAX_TRAINING_LINE_CHARS]
        yield chunk
        total += len(chunk)
        if total >= max_chars:
          return


def train_tokenizer(texts: Iterable[str], *, vocab_size: int,
                    model_path: str | None = None,
                    max_chars: int = DEFAULT_MAX_TRAINING_CHARS,
                    num_threads: int | None = None) -> Tokenizer:
  """Trains a BPE SentencePiece model with mtl_lm's reserved ids.

  Args:
    texts: training documents. They are read in order until `max_chars`
      characters, so pass a shuffled sample when the corpus is larger.
    vocab_size: total number of ids, including the 6 reserved ids and the 256
      byte-fallback pieces.
    model_path: where to write the `.model` file; None keeps it in memory.
    max_chars: stop reading `texts` after this many characters.
    num_threads: trainer threads; None uses every CPU this process may use.

  Returns:
    The trained tokenizer.

  Raises:
    ValueError: if `vocab_size` is too small for the reserved and byte pieces
      and the characters to cover, or too large for the text given.
  """
  min_vocab_size = NUM_RESERVED_IDS + 256 + 1
  if vocab_size < min_vocab_size:
    raise ValueError(
        f"vocab_size={vocab_size} is too small: {NUM_RESERVED_IDS} reserved "
        f"ids and 256 byte pieces need vocab_size >= {min_vocab_size}. Set "
        f"--config.data.vocab_size higher.")
  if max_chars <= 0:
    raise ValueError(f"max_chars={max_chars} must be positive.")
  if num_threads is None:
    num_threads = len(os.sched_getaffinity(0))

  lines = list(_training_lines(texts, max_chars))
  if not lines:
    raise ValueError(
        "No text to train the tokenizer on: every training document is empty "
        "or whitespace.")
  character_coverage = _character_coverage(lines, vocab_size)
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        control_symbols=[MASK_PIECE, SEP_PIECE],
        byte_fallback=True,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        input_sentence_size=0,  # Every line given: the cap is max_chars.
        num_threads=num_threads,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise ValueError(_explain_training_error(str(e), vocab_size)) from e
  num_chars = sum(len(line) for line in lines)
  tokenizer = Tokenizer(writer.getvalue(),
                        name=model_path or "<trained in memory>")
  if model_path:
    tokenizer.save(model_path)
  logging.info("Trained a %d-piece BPE tokenizer on %d characters (%d lines)%s.",
               tokenizer.vocab_size, num_chars, len(lines),
               f" and saved it to {model_path}" if model_path else "")
  return tokenizer


_DEFAULT_CHARACTER_COVERAGE = 0.9995
_MIN_CHARACTER_COVERAGE = 0.98  # SentencePiece rejects lower values.


def _character_coverage(lines: Sequence[str], vocab_size: int) -> float:
  """Returns the character coverage to train with, 0.98 to 0.9995.

  The default coverage is kept while its characters fit in the pieces left
  after the reserved and byte pieces. Otherwise (Chinese text with a small
  vocabulary) the characters get about half of those pieces, and the rarer
  characters are spelled with byte pieces.
  """
  counts = collections.Counter()
  for line in lines:
    counts.update(line)
  frequencies = np.sort(np.fromiter(counts.values(), np.int64))[::-1]
  shares = np.cumsum(frequencies) / frequencies.sum()
  available = vocab_size - NUM_RESERVED_IDS - 256
  needed = int(np.searchsorted(shares, _DEFAULT_CHARACTER_COVERAGE)) + 1
  if needed <= available:
    return _DEFAULT_CHARACTER_COVERAGE
  # Cover as many characters as half of the free pieces hold (slightly below
  # their share, so SentencePiece's own count stays within it), and never
  # less than SentencePiece accepts.
  budget = max(available // 2, 2)
  coverage = max(float(shares[budget - 2]), _MIN_CHARACTER_COVERAGE)
  required = int(np.searchsorted(shares, coverage)) + 1
  if required > available:
    raise ValueError(
        f"vocab_size={vocab_size} is too small for this text: its "
        f"{len(frequencies)} distinct characters need {required} pieces to "
        f"cover {100 * coverage:.0f}% of it, the least SentencePiece accepts. "
        f"Set --config.data.vocab_size to at least "
        f"{required + NUM_RESERVED_IDS + 256 + 256}.")
  logging.info(
      "The training text has %d distinct characters; vocab_size=%d covers "
      "%.2f%% of the text with about %d character pieces and spells the rest "
      "with byte pieces. Raise --config.data.vocab_size to cover more.",
      len(frequencies), vocab_size, 100 * coverage, required)
  return coverage


def _explain_training_error(message: str, vocab_size: int) -> str:
  """Turns a SentencePiece trainer error into an actionable message."""
  too_high = re.search(r"set it to a value <= (\d+)", message)
  if too_high:
    return (
        f"vocab_size={vocab_size} is too large for the training text: "
        f"SentencePiece can build at most {too_high.group(1)} pieces from it. "
        f"Set --config.data.vocab_size={too_high.group(1)} or lower, or train "
        f"on more text.")
  required = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
  if required:
    return (
        f"vocab_size={vocab_size} is smaller than the {required.group(2)} "
        f"characters needed to cover 99.95% of the training text (Chinese and "
        f"Japanese text need thousands). Set --config.data.vocab_size to more "
        f"than {int(required.group(2)) + NUM_RESERVED_IDS + 256} (those "
        f"characters plus the reserved and byte pieces), leaving room for "
        f"merged pieces.")
  return (f"SentencePiece failed to train a tokenizer with "
          f"vocab_size={vocab_size}: {message}")


def load_or_train_tokenizer(data_config, workdir: str) -> Tokenizer:
  """Returns the tokenizer a run should use, training one if needed.

  The first match wins:
    1. `data_config.tokenizer`, which must exist, if set.
    2. `WORKDIR/tokenizer.model`, if an earlier run left one.
    3. A new tokenizer trained on a deterministic sample of the training
       documents and saved to `WORKDIR/tokenizer.model`.
  The first record of every configured ArrayRecord
  shard is then checked against the tokenizer's fingerprint.

  Args:
    data_config: the `config.data` ConfigDict.
    workdir: the run's working directory.

  Raises:
    ValueError: if the configured model is missing or incompatible, if a
      tokenizer would have to be trained but train_files include ArrayRecord
      shards, or if a shard was written with another tokenizer.
  """
  # Imported here because the data package imports this module.
  from mtl_lm.data import sources  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.path.expanduser(workdir), "tokenizer.model")
  if data_config.tokenizer:
    tokenizer = Tokenizer.from_file(data_config.tokenizer)
    logging.info("Loaded tokenizer %s (vocab_size=%d).", data_config.tokenizer,
                 tokenizer.vocab_size)
  elif os.path.exists(path):
    tokenizer = Tokenizer.from_file(path)
    logging.info("Reusing tokenizer %s (vocab_size=%d).", path,
                 tokenizer.vocab_size)
  else:
    tokenizer = train_tokenizer_on_corpus(data_config, model_path=path)
  sources.check_shard_tokenizer(data_config, tokenizer)
  return tokenizer


def train_tokenizer_on_corpus(data_config, *, model_path: str,
                              max_chars: int = DEFAULT_MAX_TRAINING_CHARS
                              ) -> Tokenizer:
  """Trains a tokenizer on a seeded sample of the configured documents.

  Args:
    data_config: the `config.data` ConfigDict; reads train_files (empty: the
      CPython documentation), vocab_size and shuffle_seed.
    model_path: where to write the `.model` file.
    max_chars: size of the sample, in characters.

  Raises:
    ValueError: see `train_tokenizer` and `mtl_lm.data.sources.load_sources`.
  """
  # Imported here because the data package imports this module.
  from mtl_lm.data import sources  # pylint: disable=g-import-not-at-top

  if sources.has_pretokenized_files(data_config):
    raise ValueError(
        "Cannot train a tokenizer when --config.data.train_files includes "
        ".array_record shards: their ids only make sense with the tokenizer "
        "that wrote them. Set --config.data.tokenizer to the tokenizer.model "
        "that launch/prepare_data.py saved next to the shards.")
  documents = sources.load_documents(data_config)
  texts = sources.sample_texts(documents, max_chars=max_chars,
                               seed=data_config.shuffle_seed)
  logging.info("Training a tokenizer (vocab_size=%d) for %s.",
               data_config.vocab_size, model_path)
  return train_tokenizer(texts, vocab_size=data_config.vocab_size,
                         model_path=model_path, max_chars=max_chars)


def _write_bytes_atomically(path: str, data: bytes) -> None:
  path = os.path.expanduser(path)
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  temporary = f"{path}.tmp.{os.getpid()}"
  with open(temporary, "wb") as f:
    f.write(data)
  os.replace(temporary, path)
