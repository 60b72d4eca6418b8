import json

import pytest

from unmask.data.tokenizer import SPECIALS, Tokenizer, TokenizerError


def test_trained_bpe_has_specials_and_round_trips(tiny_data):
    tok = tiny_data.tokenizer
    assert tok.vocab_size == 320
    assert len({tok.mask_id, tok.bos_id, tok.eos_id, tok.pad_id}) == 4
    text = "def parse(x):\n    return x  # ünïcode"
    assert tok.decode(tok.encode(text)) == text


def test_byte_lengths_count_utf8_bytes(tiny_data):
    tok = tiny_data.tokenizer
    text = "import os\nprint('héllo')\n"
    lengths = tok.byte_lengths()
    assert lengths[tok.encode(text)].sum() == len(text.encode("utf-8"))
    assert lengths[tok.mask_id] == 0


def test_save_load_and_mask_added_to_foreign_tokenizer(tiny_data, tmp_path):
    tok = tiny_data.tokenizer
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)
    assert again.fingerprint == tok.fingerprint and again.mask_id == tok.mask_id
    # A "foreign" HF tokenizer without [MASK]: loading adds the missing special tokens.
    raw = json.loads((tmp_path / "tokenizer.json").read_text())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != SPECIALS["mask"]]
    del raw["model"]["vocab"][SPECIALS["mask"]]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "tokenizer.json").write_text(json.dumps(raw))
    foreign = Tokenizer.load(tmp_path / "foreign")
    assert foreign.hf.token_to_id(SPECIALS["mask"]) == foreign.mask_id
    assert foreign.decode([foreign.mask_id], skip_special=False) == SPECIALS["mask"]


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path)
