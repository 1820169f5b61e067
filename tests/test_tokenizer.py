"""Tests of the SentencePiece tokenizer and its reserved ids."""

import io
import os
import pickle

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from mtl_lm import tokenizer as tokenizer_lib

_VOCAB_SIZE = 400

_ENGLISH = ("The quick brown fox jumps over the lazy dog. "
            "She sells sea shells by the sea shore! "
            "How much wood would a woodchuck chuck? ")
_CHINESE = "今天天气很好。我们去公园散步吧！你觉得怎么样？他说：“好的。”"


def _corpus() -> list[str]:
  return [f"{_ENGLISH}{i}\n{_CHINESE}" for i in range(200)]


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.train_tokenizer(_corpus(), vocab_size=_VOCAB_SIZE,
                                       num_threads=1)


def test_reserved_pieces(tokenizer):
  pieces = tuple(tokenizer.id_to_piece(i)
                 for i in range(tokenizer_lib.NUM_RESERVED_IDS))
  assert pieces == ("<pad>", "<unk>", "<s>", "</s>", "<mask>", "<sep>")
  assert tokenizer_lib.MASK_ID == 4
  assert tokenizer_lib.SEP_ID == 5


def test_vocab_size(tokenizer):
  assert tokenizer.vocab_size == _VOCAB_SIZE


def test_is_special(tokenizer):
  ids = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
  expected = np.array([[True, True, True, True], [True, True, False, False]])
  np.testing.assert_array_equal(tokenizer.is_special(ids), expected)


def test_encode_adds_no_bos_or_eos(tokenizer):
  ids = tokenizer.encode("The dog.")
  assert ids
  assert tokenizer_lib.BOS_ID not in ids
  assert tokenizer_lib.EOS_ID not in ids


def test_mask_text_is_not_mask_id(tokenizer):
  text = "a <mask> b <sep> </s> <pad>"
  ids = tokenizer.encode(text)
  assert min(ids) >= tokenizer_lib.NUM_RESERVED_IDS
  assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", [
    "The quick brown fox.",
    "  two  spaces,\ttab\nnewline\n\n  indented code:  x = 1",
    _CHINESE,
    "Mixed 混合 text: 3.14 and ！？",
])
def test_decode_inverts_encode(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_rare_chinese_uses_byte_fallback(tokenizer):
  text = "龘𠀀"  # Neither character occurs in the training text.
  ids = tokenizer.encode(text)
  pieces = [tokenizer.id_to_piece(i) for i in ids]
  # 3 UTF-8 bytes for U+9F98 and 4 for U+20000.
  assert pieces == ["<0xE9>", "<0xBE>", "<0x98>",
                    "<0xF0>", "<0xA0>", "<0x80>", "<0x80>"]
  assert tokenizer_lib.UNK_ID not in ids
  assert tokenizer.decode(ids) == text


def test_chinese_merges_frequent_words(tokenizer):
  ids = tokenizer.encode("今天天气很好")
  # Frequent in training, so BPE merges it into fewer pieces than characters.
  assert len(ids) < len("今天天气很好")


def test_decode_skips_padding(tokenizer):
  ids = tokenizer.encode("The dog.")
  padded = np.array([0, 0] + ids + [0, 0, 0], dtype=np.int32)
  assert tokenizer.decode(padded) == "The dog."


def test_pickle_round_trip(tokenizer):
  tokenizer.encode("warm up the processor")
  restored = pickle.loads(pickle.dumps(tokenizer))
  assert restored._processor is None  # Rebuilt lazily in the new process.
  text = _ENGLISH + _CHINESE
  assert restored.encode(text) == tokenizer.encode(text)
  assert restored.fingerprint == tokenizer.fingerprint
  assert restored.vocab_size == tokenizer.vocab_size


def test_save_and_load(tokenizer, tmp_path):
  path = str(tmp_path / "sub" / "tokenizer.model")
  tokenizer.save(path)
  loaded = tokenizer_lib.Tokenizer.from_file(path)
  assert loaded.model_proto == tokenizer.model_proto
  assert loaded.encode(_CHINESE) == tokenizer.encode(_CHINESE)


def test_training_is_deterministic(tokenizer):
  again = tokenizer_lib.train_tokenizer(_corpus(), vocab_size=_VOCAB_SIZE,
                                        num_threads=1)
  assert again.fingerprint == tokenizer.fingerprint


def test_long_lines_are_used_for_training():
  # One 20,000-character line: SentencePiece would drop it whole (it is longer
  # than max_sentence_length), leaving too few characters to train on.
  line = " ".join(f"word{i % 50}" for i in range(3000))
  trained = tokenizer_lib.train_tokenizer([line], vocab_size=280,
                                          num_threads=1)
  assert len(trained.encode("word12 word34")) < len("word12 word34")


def _train_plain_sentencepiece(path, **options):
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_corpus()), model_writer=writer, vocab_size=400,
      model_type="bpe", minloglevel=2, byte_fallback=True, **options)
  with open(path, "wb") as f:
    f.write(writer.getvalue())


def test_wrong_special_pieces_raise(tmp_path):
  path = str(tmp_path / "default.model")
  # SentencePiece's defaults: <unk>=0, <s>=1, </s>=2, no pad and no <mask>.
  _train_plain_sentencepiece(path)
  with pytest.raises(ValueError, match="train_tokenizer.py") as error:
    tokenizer_lib.Tokenizer.from_file(path)
  assert "'<unk>', '<s>', '</s>'" in str(error.value)


def test_user_defined_mask_raises(tmp_path):
  # Right pieces at the right ids, but "<mask>" as a user-defined symbol
  # would be produced from the text "<mask>".
  path = str(tmp_path / "user_defined.model")
  _train_plain_sentencepiece(path, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                             user_defined_symbols=["<mask>", "<sep>"])
  with pytest.raises(ValueError, match="control symbols"):
    tokenizer_lib.Tokenizer.from_file(path)


def test_missing_file_raises(tmp_path):
  with pytest.raises(ValueError, match="not found"):
    tokenizer_lib.Tokenizer.from_file(str(tmp_path / "missing.model"))


def test_invalid_model_bytes_raise(tmp_path):
  path = tmp_path / "junk.model"
  path.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a valid SentencePiece model"):
    tokenizer_lib.Tokenizer.from_file(str(path))


def test_vocab_too_large_raises():
  with pytest.raises(ValueError, match="vocab_size=5000 is too large"):
    tokenizer_lib.train_tokenizer(["tiny text. " * 5], vocab_size=5000,
                                  num_threads=1)


def test_vocab_too_small_for_characters_raises():
  # 1,500 distinct CJK characters, each equally frequent: even the 98%
  # coverage that SentencePiece accepts at least needs 1,470 of them.
  text = "".join(chr(0x4E00 + i) for i in range(1500))
  with pytest.raises(ValueError, match="vocab_size=600 is too small for this text"):
    tokenizer_lib.train_tokenizer([text] * 3, vocab_size=600, num_threads=1)


def test_vocab_below_reserved_and_bytes_raises():
  with pytest.raises(ValueError, match="vocab_size=200 is too small"):
    tokenizer_lib.train_tokenizer(_corpus(), vocab_size=200)


def test_blank_text_raises():
  with pytest.raises(ValueError, match="No text"):
    tokenizer_lib.train_tokenizer(["", "  \n "], vocab_size=300)


def _data_config(tmp_path, **overrides):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join(_corpus()), encoding="utf-8")
  config = ml_collections.ConfigDict({
      "train_files": str(corpus), "train_weights": "", "jsonl_field": "text",
      "tokenizer": "", "vocab_size": 350, "max_bad_fraction": 0.01,
      "shuffle_seed": 0})
  config.update(overrides)
  return config


def test_load_or_train_trains_then_reuses(tmp_path):
  data_config = _data_config(tmp_path)
  workdir = str(tmp_path / "run")
  trained = tokenizer_lib.load_or_train_tokenizer(data_config, workdir)
  path = os.path.join(workdir, "tokenizer.model")
  assert trained.vocab_size == 350
  assert os.path.exists(path)

  # A different vocab_size proves the second call reuses the saved model.
  data_config.vocab_size = 320
  reused = tokenizer_lib.load_or_train_tokenizer(data_config, workdir)
  assert reused.fingerprint == trained.fingerprint


def test_load_or_train_prefers_configured_model(tmp_path, tokenizer):
  path = str(tmp_path / "given.model")
  tokenizer.save(path)
  data_config = _data_config(tmp_path, tokenizer=path)
  loaded = tokenizer_lib.load_or_train_tokenizer(data_config,
                                                 str(tmp_path / "run"))
  assert loaded.fingerprint == tokenizer.fingerprint
  assert not os.path.exists(tmp_path / "run" / "tokenizer.model")


def test_load_or_train_missing_configured_model_raises(tmp_path):
  data_config = _data_config(tmp_path, tokenizer=str(tmp_path / "nope.model"))
  with pytest.raises(ValueError, match="nope.model"):
    tokenizer_lib.load_or_train_tokenizer(data_config, str(tmp_path / "run"))
