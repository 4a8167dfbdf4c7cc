"""The offline demo corpus: this Python's own standard-library sources, prepared once and cached.

    path = ensure_demo_data(default_demo_dir(seq_len=256), seq_len=256)   # or: python -m data.demo --seq-len 256

Real text that every machine with Python has, no download. Files are the stdlib's .py sources in sorted
path order without tests, site-packages and caches, taken until the token budget (default 8M tokens,
about 8 MB with the byte tokenizer, a few seconds to prepare) is reached. The same Python version gives
the same corpus.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
from pathlib import Path

from data.prepare import format_summary, prepare, read_meta
from data.tokenizer import load_tokenizer

DEFAULT_MAX_TOKENS = 8_000_000
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def stdlib_sources(max_bytes: int | None = None) -> list[Path]:
    """The standard library's .py files (sorted, tests excluded), up to about `max_bytes` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]  # never descend into site-packages
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py") and not f.startswith("test_")]
    files = sorted(found, key=lambda p: str(p.relative_to(root)))
    if not files:
        raise FileNotFoundError(f"no Python sources under {root} for the demo corpus")
    chosen, total = [], 0
    for path in files:
        if max_bytes is not None and total >= max_bytes:
            break
        chosen.append(path)
        total += path.stat().st_size
    return chosen


def default_demo_dir(seq_len: int, tokenizer: str = "bytes") -> Path:
    """$HYBRID_PRETRAIN_CACHE (default ~/.cache/hybrid-pretrain)/demo-<tokenizer>-seq<seq_len>."""
    cache = os.environ.get("HYBRID_PRETRAIN_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hybrid-pretrain"
    name = "bytes" if tokenizer == "bytes" else Path(tokenizer).stem
    return Path(cache).expanduser() / f"demo-{name}-seq{seq_len}"


def _is_cached(out_dir: Path, seq_len: int, spec: str, max_tokens: int) -> bool:
    meta = read_meta(out_dir)
    return (meta is not None and (out_dir / "index.json").is_file() and meta["seq_len"] == seq_len
            and meta["tokenizer"] == spec and meta["max_tokens"] == max_tokens)


def ensure_demo_data(out_dir: str | os.PathLike, seq_len: int, tokenizer: str = "bytes",
                     max_tokens: int = DEFAULT_MAX_TOKENS, progress: bool = True) -> Path:
    """Return `out_dir` holding the demo corpus prepared for seq_len; prepare it first unless cached.

    Safe to call from several processes at once (a file lock beside out_dir serialises them), and a
    killed prepare never leaves a directory that passes as complete (prepare renames it into place).
    """
    from filelock import FileLock  # a dependency of mosaicml-streaming

    out_dir = Path(out_dir).expanduser().resolve()
    spec = load_tokenizer(tokenizer).spec
    if _is_cached(out_dir, seq_len, spec, max_tokens):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir.parent / f".{out_dir.name}.lock")):
        if _is_cached(out_dir, seq_len, spec, max_tokens):  # another process prepared it meanwhile
            return out_dir
        if out_dir.exists() and any(out_dir.iterdir()) and read_meta(out_dir) is None:
            raise FileExistsError(f"{out_dir} exists and is not a prepared dataset; not overwriting it")
        files = stdlib_sources(max_bytes=max_tokens)
        summary = prepare([], tokenizer, out_dir, seq_len, max_tokens=max_tokens, overwrite=True,
                          progress=progress, input_files=files)
        if progress:
            print(format_summary(summary))
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.demo", description="prepare the demo corpus (cached)")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--tokenizer", default="bytes")
    p.add_argument("--out", default=None, help="default: " + str(default_demo_dir(0)).replace("seq0", "seq<N>"))
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    args = p.parse_args(argv)
    out = args.out or default_demo_dir(args.seq_len, args.tokenizer)
    print(ensure_demo_data(out, args.seq_len, args.tokenizer, args.max_tokens))


if __name__ == "__main__":
    main()
