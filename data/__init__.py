"""Data path: tokenize raw text, pack it into MDS shards, and stream it to training.

    python -m data.prepare --input <files|dirs|globs> --tokenizer <tokenizer.json|bytes> --out DIR --seq-len N
    python -m data.tokenizer train --input <text> --vocab-size N --out DIR     # offline BPE
    python -m data.demo --seq-len N                                            # stdlib demo corpus

Modules: tokenizer (load_tokenizer, train_bpe), prepare (prepare, read_meta), demo (ensure_demo_data),
dataset (build_train_loader, infinite_batches, check_prepared, clean_stale_streaming_shm).
"""
