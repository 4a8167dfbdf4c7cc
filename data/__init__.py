"""Data path: tokenize raw text, pack it into MDS shards, and stream it to training.

    python -m data.prepare --input <files|dirs|globs> --tokenizer <tokenizer.json|bytes> --out DIR|s3://... \
        --seq-len N [--workers N] [--compression zstd]
    python -m data.tokenizer train --input <text> --vocab-size N --out DIR     # offline BPE
    python -m data.demo --seq-len N                                            # stdlib demo corpus

Modules: tokenizer (load_tokenizer, train_bpe), inputs (find_inputs, iter_documents: txt/jsonl/parquet),
encode (encoded_documents: ordered, optionally parallel tokenization), prepare (prepare, read_meta; local
or s3://... output), demo (ensure_demo_data), streams (stream_specs, check_stream: one path or a mixture,
local or remote), dataset (build_train_loader, infinite_batches, clean_stale_streaming_shm),
registration_lock (streaming_registration_lock: one job at a time per host picks its shared-memory prefix),
synthetic (write_synthetic: random data in the prepared format).
"""
