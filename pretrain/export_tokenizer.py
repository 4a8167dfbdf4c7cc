"""Tokenizer files for a Hugging Face export: tokenizer.json, tokenizer_config.json, special_tokens_map.json.

The byte tokenizer ("bytes": ids 0..255 are the UTF-8 bytes, 256 is EOS) is written as an exact
`tokenizers` equivalent: a BPE model with no merges whose vocabulary holds the 256 ByteLevel
characters (GPT-2's byte-to-unicode map) in byte order, a ByteLevel pre-tokenizer without regex
splitting or prefix space, a ByteLevel decoder, and `<|endoftext|>` as the special token 256. It
encodes every string to exactly its UTF-8 bytes (tests check it). One difference remains: like every
Hugging Face tokenizer it turns the literal text "<|endoftext|>" into id 256 unless the caller sets
`split_special_tokens=True`; ours always encodes text as bytes.

A tokenizer.json path is copied with the tokenizer_config.json / special_tokens_map.json beside it
when present; otherwise a tokenizer_config.json naming its EOS token is written.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

BYTE_EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer():
    """A `tokenizers.Tokenizer` identical to data.tokenizer.ByteTokenizer (ids = UTF-8 bytes, EOS 256)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    b2u = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_EOS, special=True, normalized=False)])
    assert tok.token_to_id(BYTE_EOS) == 256
    return tok


def _tokenizer_config(eos: str, model_max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "pad_token": eos,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }


def write_tokenizer(spec: str, out_dir: str | Path, model_max_length: int) -> tuple[int, str]:
    """Write the tokenizer files for `spec` ("bytes" or a tokenizer.json path); returns (eos id, what was written)."""
    out = Path(out_dir)
    if spec == "bytes":
        byte_tokenizer().save(str(out / "tokenizer.json"))
        eos, eos_id, what = BYTE_EOS, 256, "byte tokenizer (exact tokenizers equivalent)"
        (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(eos, model_max_length), indent=2) + "\n")
    else:
        from data.tokenizer import HFTokenizer

        src = Path(spec).expanduser()
        tok = HFTokenizer(src)  # finds the EOS token the same way data preparation did
        eos, eos_id, what = tok.eos_token, tok.eos_id, f"copied {src}"
        shutil.copyfile(src, out / "tokenizer.json")
        copied = False
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (src.parent / name).is_file():
                shutil.copyfile(src.parent / name, out / name)
                copied = True
        if not copied:
            (out / "tokenizer_config.json").write_text(
                json.dumps(_tokenizer_config(eos, model_max_length), indent=2) + "\n")
    if not (out / "special_tokens_map.json").is_file():
        (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos, "pad_token": eos}, indent=2) + "\n")
    return eos_id, what
