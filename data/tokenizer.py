"""Tokenizers for data preparation: the offline byte tokenizer and Hugging Face tokenizer.json files.

    tok = load_tokenizer("bytes")                      # ids 0..255 = UTF-8 bytes, EOS = 256
    tok = load_tokenizer("path/to/tokenizer.json")     # any Hugging Face `tokenizers` file
    ids = tok.encode("text")                           # list[int], no special tokens added
    tok.decode(ids), tok.vocab_size, tok.eos_id, tok.spec

`spec` is what goes into prepare_meta.json ("bytes" or the absolute path of the file).

Train a byte-level BPE tokenizer on your own text (offline; writes tokenizer.json + tokenizer_config.json,
loadable by data.prepare and by transformers' AutoTokenizer):

    python -m data.tokenizer train --input corpus/ --vocab-size 32000 --out tokenizers/mine
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence

BYTES_SPEC = "bytes"

# End-of-document tokens in the order we look for them (GPT-2/NeoX, Llama 3, Llama/Mistral/T5, Gemma, ...).
EOS_CANDIDATES = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eos|>",
    "[EOS]",
    "<|im_end|>",
    "<|end|>",
)


class Tokenizer(Protocol):
    spec: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and EOS = 256 (vocab_size 257). Needs no files: the offline demo uses it."""

    spec = BYTES_SPEC
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_bytes(self, text: str) -> bytes:
        """The ids as a bytes object (fast path for numpy: np.frombuffer(..., np.uint8))."""
        return text.encode("utf-8")

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` loaded from a tokenizer.json file."""

    def __init__(self, path: str | Path, eos_token: str | None = None):
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file not found: {path} (pass a Hugging Face tokenizer.json or 'bytes')"
            )
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"cannot load tokenizer {path}: {err}") from err
        # Text that spells a special token ("<|endoftext|>" in a document) stays plain text: only
        # prepare decides where documents end.
        self._tok.encode_special_tokens = True
        self.spec = str(path)
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token, self.eos_id = self._find_eos(eos_token)

    def _find_eos(self, eos_token: str | None) -> tuple[str, int]:
        if eos_token is not None:
            eos_id = self._tok.token_to_id(eos_token)
            if eos_id is None:
                raise ValueError(f"EOS token {eos_token!r} is not in the vocabulary of {self.path}")
            return eos_token, eos_id
        candidates = list(EOS_CANDIDATES)
        # A tokenizer_config.json next to the file names the EOS token explicitly: trust it first.
        config = self.path.parent / "tokenizer_config.json"
        if config.is_file():
            try:
                named = json.loads(config.read_text()).get("eos_token")
                if isinstance(named, dict):
                    named = named.get("content")
                if isinstance(named, str):
                    candidates.insert(0, named)
            except (OSError, ValueError):
                pass
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        for token in sorted(candidates, key=lambda t: t not in special):  # special tokens first
            eos_id = self._tok.token_to_id(token)
            if eos_id is not None:
                return token, eos_id
        raise ValueError(
            f"cannot find an end-of-document token in {self.path} (looked for "
            f"{', '.join(EOS_CANDIDATES)}; special tokens: {sorted(special) or 'none'}). "
            "Name it with --eos-token <token>."
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.spec!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r}/{self.eos_id})"


def load_tokenizer(spec: str | Path, eos_token: str | None = None) -> Tokenizer:
    """Load "bytes" or a Hugging Face tokenizer.json path; `eos_token` overrides EOS detection."""
    if str(spec) == BYTES_SPEC:
        if eos_token is not None:
            raise ValueError("--eos-token does not apply to the byte tokenizer (its EOS is id 256)")
        return ByteTokenizer()
    return HFTokenizer(spec, eos_token=eos_token)


# ----------------------------------------------------------------------------------------------- training
def train_bpe(inputs, out_dir, vocab_size: int, *, text_field: str = "text", eos_token: str = "<|endoftext|>",
              special_tokens: Sequence[str] = (), max_bytes: int | None = None, progress: bool = True) -> Path:
    """Train a GPT-2-style byte-level BPE on `inputs` (as data.prepare reads them); return tokenizer.json's path."""
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from data.inputs import find_inputs, iter_documents

    specials = [eos_token] + [t for t in special_tokens if t != eos_token]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"--vocab-size {vocab_size} is below 256 bytes + {len(specials)} special tokens")
    files = find_inputs(inputs)

    def texts():
        seen = 0
        for text, nbytes in iter_documents(files, text_field):
            if max_bytes is not None and seen >= max_bytes:
                return
            seen += nbytes
            if text:
                yield text

    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token, "bos_token": eos_token,
              "unk_token": None, "add_bos_token": False, "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out / "tokenizer.json"


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m data.tokenizer", description="tokenizer tools")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer on text files (offline)")
    t.add_argument("--input", nargs="+", required=True, action="extend", help="files, directories or globs")
    t.add_argument("--out", required=True, help="directory for tokenizer.json and tokenizer_config.json")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--text-field", default="text", help="JSON field holding the text in .jsonl files")
    t.add_argument("--eos-token", default="<|endoftext|>")
    t.add_argument("--special-tokens", nargs="*", default=[], help="more special tokens to reserve")
    t.add_argument("--max-bytes", type=int, default=None, help="train on at most this much text")
    args = p.parse_args(argv)
    try:
        path = train_bpe(args.input, args.out, args.vocab_size, text_field=args.text_field,
                         eos_token=args.eos_token, special_tokens=args.special_tokens, max_bytes=args.max_bytes)
    except (FileNotFoundError, ValueError) as err:
        p.exit(2, f"error: {err}\n")
    tok = load_tokenizer(path)
    print(f"wrote {path} (vocab_size {tok.vocab_size}, eos {tok.eos_token!r} = {tok.eos_id})")


if __name__ == "__main__":
    main()
