"""Tokenizers for data preparation: the offline byte tokenizer and Hugging Face tokenizer.json files.

    tok = load_tokenizer("bytes")                      # ids 0..255 = UTF-8 bytes, EOS = 256
    tok = load_tokenizer("path/to/tokenizer.json")     # any Hugging Face `tokenizers` file
    ids = tok.encode("text")                           # list[int], no special tokens added
    tok.decode(ids), tok.vocab_size, tok.eos_id, tok.spec

`spec` is what goes into prepare_meta.json ("bytes" or the absolute path of the file).
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
