"""Helpers shared by the data tests: small corpora and a tiny BPE tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = "def f(x):\n    return x ** 2  # ünïcødé ∑ 🙂\n"


def build_bpe(path, special=("<|endoftext|>",), vocab_size=400):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, "hello world " * 20, "the quick brown fox " * 10], trainer)
    tok.save(str(path))
    return path


def write_corpus(root: Path, num_txt: int = 3, num_jsonl_docs: int = 40, field: str = "text") -> Path:
    """Distinct documents of varied length (some longer than a sample) in .txt files and one .jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(num_txt):
        (root / f"doc{i}.txt").write_text(f"text file {i}: " + "lorem ipsum é ∑ " * (5 + 13 * i) + "\n")
    with open(root / "docs.jsonl", "w") as f:
        for i in range(num_jsonl_docs):
            f.write(json.dumps({field: f"jsonl document {i:03d} " + "abc " * (i % 11), "id": i}) + "\n")
        f.write(json.dumps({field: ""}) + "\n")  # an empty document is skipped
    return root


def expected_documents(root: Path, field: str = "text") -> list[str]:
    """The non-empty documents of write_corpus in the order prepare reads them (sorted paths)."""
    docs = []
    for path in sorted(root.iterdir(), key=lambda p: str(p.resolve())):
        if path.suffix == ".jsonl":
            docs += [json.loads(line)[field] for line in path.read_text().splitlines() if line.strip()]
        elif path.suffix == ".txt":
            docs.append(path.read_text())
    return [d for d in docs if d]
