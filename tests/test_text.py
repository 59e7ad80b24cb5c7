import pytest

from captioner.text import SPECIAL_TOKENS, Vocabulary, normalize, tokenize


def test_normalize_lowercases_and_strips_punctuation():
    assert normalize("A Dog's  ball, RED!\r\n") == "a dog's ball red"
    assert normalize("  ...  ") == ""
    assert tokenize("Two dogs -- playing.") == ["two", "dogs", "playing"]


def test_vocabulary_min_count_order_and_specials():
    vocab = Vocabulary.build(["a dog", "a cat", "A dog runs"], min_count=2)
    assert vocab.words[:4] == list(SPECIAL_TOKENS)
    assert vocab.words[4:] == ["a", "dog"]  # frequency, then alphabetical
    assert vocab.pad_id == 0


def test_encode_decode_round_trip_and_unknown_words():
    vocab = Vocabulary.build(["a dog runs", "a dog sits"], min_count=1)
    ids = vocab.encode("A dog flies!")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert vocab.decode(ids) == "a dog <unk>"
    assert vocab.encode("a dog runs fast and far", max_len=2)[-1] == vocab.end_id
    assert len(vocab.encode("a dog runs fast and far", max_len=2)) == 4
    assert vocab.decode([vocab.start_id, 4, vocab.end_id, 5]) == "a"


def test_save_load(tmp_path):
    vocab = Vocabulary.build(["a dog runs"], min_count=1)
    vocab.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json") == vocab
    (tmp_path / "bad.json").write_text('{"words": ["a"]}')
    with pytest.raises(ValueError, match="bad.json"):
        Vocabulary.load(tmp_path / "bad.json")
