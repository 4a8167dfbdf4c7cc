"""data.tokenizer: the byte tokenizer and Hugging Face tokenizer.json files."""
from __future__ import annotations

import json

import pytest
from data_test_utils import TEXT, build_bpe, write_corpus
from tokenizers import Tokenizer

from data.tokenizer import ByteTokenizer, load_tokenizer


def test_bytes_round_trip():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.spec) == (257, 256, "bytes")
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids + [tok.eos_id]) == TEXT  # EOS decodes to nothing
    assert tok.encode_batch([TEXT, ""]) == [ids, []]


def test_tokenizer_json_round_trip(tmp_path):
    path = build_bpe(tmp_path / "tokenizer.json")
    tok = load_tokenizer(str(path))
    hf = Tokenizer.from_file(str(path))
    assert tok.eos_id == hf.token_to_id("<|endoftext|>")
    assert tok.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    assert tok.spec == str(path.resolve())
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.encode_batch([TEXT, "hello world"]) == [ids, tok.encode("hello world")]


def test_special_token_text_stays_text(tmp_path):
    tok = load_tokenizer(build_bpe(tmp_path / "tokenizer.json"))
    ids = tok.encode("a <|endoftext|> b")
    assert tok.eos_id not in ids  # only prepare decides where documents end
    assert tok.decode(ids) == "a <|endoftext|> b"


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")


def test_no_eos_suggests_flag(tmp_path):
    path = build_bpe(tmp_path / "tok.json", special=("<pad>",))
    with pytest.raises(ValueError, match=r"tok\.json.*--eos-token"):
        load_tokenizer(path)
    tok = load_tokenizer(path, eos_token="<pad>")
    assert tok.eos_id == Tokenizer.from_file(str(path)).token_to_id("<pad>")
    with pytest.raises(ValueError, match="<nothere>"):
        load_tokenizer(path, eos_token="<nothere>")


def test_eos_from_tokenizer_config(tmp_path):
    path = build_bpe(tmp_path / "tokenizer.json", special=("<|endoftext|>", "<my_eos>"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<my_eos>"}))
    assert load_tokenizer(path).eos_token == "<my_eos>"


def test_train_bpe_loads_in_prepare_and_transformers(tmp_path, capsys):
    from transformers import AutoTokenizer

    from data.prepare import prepare
    from data.tokenizer import main

    corpus = write_corpus(tmp_path / "in")
    main(["train", "--input", str(corpus), "--vocab-size", "320", "--out", str(tmp_path / "tok")])
    assert "vocab_size 320" in capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "tok" / "tokenizer.json")
    assert (tok.vocab_size, tok.eos_token) == (320, "<|endoftext|>")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert hf.eos_token_id == tok.eos_id
    assert hf(TEXT)["input_ids"] == tok.encode(TEXT) and hf.decode(tok.encode(TEXT)) == TEXT
    summary = prepare([corpus], str(tmp_path / "tok" / "tokenizer.json"), tmp_path / "out", 16, progress=False)
    assert summary["eos_id"] == tok.eos_id and summary["vocab_size"] == 320
    with pytest.raises(SystemExit):
        main(["train", "--input", str(corpus), "--vocab-size", "100", "--out", str(tmp_path / "t2")])
