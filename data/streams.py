"""Which prepared datasets a loader reads: one directory or a mixture of streams, local or remote.

A stream is one data.prepare output, read either from a local directory or from object storage
(s3://, gs://, ... as mosaicml-streaming supports) through a local cache directory:

    {"path": "data/web"}                                      local directory (alias: "local")
    {"remote": "s3://bucket/code", "local": "/cache/code"}    remote, cached in `local`
    + one weight: "proportion" (relative; all streams or none), or "repeat" / "choose" (absolute)

Mixing, sampling and resumption are mosaicml-streaming's own (`streaming.Stream` objects passed to
StreamingDataset): proportions are normalised to sum to 1 and an epoch then has as many samples as all
streams together (streams drawn more often than their size repeat samples, smaller ones are subsampled,
deterministically from the shuffle seed); without proportions each stream contributes repeat x its
samples, or `choose` samples, or all its samples once.

`check_stream` runs before streaming touches a stream: it reads prepare_meta.json and index.json (for a
remote stream it first downloads both into the cache), checks seq_len/vocab_size, and for a local stream
that every shard file exists with the size index.json records, so a missing, truncated or empty dataset
fails at start-up with a message naming the stream.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from data.prepare import FORMAT, META_FILE, read_meta

_KEYS = {"path", "local", "remote", "proportion", "repeat", "choose"}


@dataclass(frozen=True)
class StreamSpec:
    """One stream: `local` is the data directory (local stream) or the cache directory (remote stream)."""

    local: str
    remote: str | None = None
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None
    name: str = "data.path"  # how errors refer to it, e.g. data.streams[1]

    @property
    def where(self) -> str:
        return self.remote or self.local


def stream_specs(path: str | os.PathLike | None = None,
                 streams: Sequence[Mapping[str, Any]] | None = None, key: str = "data") -> list[StreamSpec]:
    """Normalise `path` (one local stream) or `streams` (dicts as in the module docstring) into specs.

    Raises ValueError naming `key.streams[i].<field>` for empty lists, missing paths and bad weights."""
    if streams is None or len(streams) == 0:
        if streams is not None and not path:
            raise ValueError(f"{key}.streams is empty: give at least one stream (or {key}.path)")
        if not path:
            raise ValueError(f"{key}.path is empty: name a prepared dataset directory (python -m data.prepare)")
        return [StreamSpec(local=str(Path(path).expanduser()), name=f"{key}.path")]
    if path:
        raise ValueError(f"{key}.path={str(path)!r} and {key}.streams are both set: use one of them")
    specs = []
    for i, raw in enumerate(streams):
        name = f"{key}.streams[{i}]"
        raw = {k: v for k, v in dict(raw).items() if v is not None and v != ""}
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise ValueError(f"{name}: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
        if "path" in raw and "local" in raw:
            raise ValueError(f"{name}: give `path` (a local stream) or `local` (also the cache of `remote`), not both")
        local = raw.get("path", raw.get("local"))
        remote = raw.get("remote")
        if not local:
            raise ValueError(f"{name}.{'local' if remote else 'path'} is missing: "
                             + ("a remote stream needs a local cache directory" if remote
                                else "name a prepared dataset directory"))
        weights = [w for w in ("proportion", "repeat", "choose") if w in raw]
        if len(weights) > 1:
            raise ValueError(f"{name}: at most one of proportion, repeat, choose (got {weights})")
        if "proportion" in raw and not (isinstance(raw["proportion"], (int, float)) and raw["proportion"] > 0):
            raise ValueError(f"{name}.proportion={raw['proportion']!r}: must be a number > 0")
        if "repeat" in raw and not (isinstance(raw["repeat"], (int, float)) and raw["repeat"] > 0):
            raise ValueError(f"{name}.repeat={raw['repeat']!r}: must be a number > 0")
        if "choose" in raw and not (isinstance(raw["choose"], int) and raw["choose"] > 0):
            raise ValueError(f"{name}.choose={raw['choose']!r}: must be an integer > 0")
        specs.append(StreamSpec(local=str(Path(local).expanduser()), remote=remote,
                                proportion=raw.get("proportion"), repeat=raw.get("repeat"),
                                choose=raw.get("choose"), name=name))
    with_prop = [s.proportion is not None for s in specs]
    if any(with_prop) and not all(with_prop):
        missing = [s.name for s in specs if s.proportion is None]
        raise ValueError(f"{', '.join(missing)}: no proportion, but other streams have one; proportions are "
                         f"relative, so give every stream one (or use repeat/choose, which are absolute)")
    return specs


# ----------------------------------------------------------------------------------------------- checks
def _fetch(remote_dir: str, local_dir: str, filename: str) -> Path:
    """Download remote_dir/filename into local_dir (atomically: several ranks may do it at once)."""
    from streaming.base.storage import CloudDownloader

    target = Path(local_dir) / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{filename}.{os.getpid()}.tmp")
    try:
        CloudDownloader.direct_download(f"{remote_dir.rstrip('/')}/{filename}", str(tmp))
        os.replace(tmp, target)
    except Exception as err:  # the clouds raise their own types (botocore ClientError, ...)
        tmp.unlink(missing_ok=True)
        raise FileNotFoundError(f"cannot read {remote_dir.rstrip('/')}/{filename}: {err}") from None
    return target


def check_stream(spec: StreamSpec, seq_len: int, vocab_size: int | None = None) -> dict:
    """prepare_meta.json of the stream after the checks in the module docstring; raises with the stream named."""
    hint = (f"create it with `python -m data.prepare --input <text files> --tokenizer <tokenizer.json|bytes> "
            f"--out {spec.where} --seq-len {seq_len}`")
    local = Path(spec.local)
    if spec.remote:
        for filename in (META_FILE, "index.json"):
            try:
                _fetch(spec.remote, spec.local, filename)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{spec.name}: no prepared dataset at {spec.remote} ({err}); {hint}") from None
    if not (local / "index.json").is_file():
        what = "does not exist" if not local.exists() else "has no index.json"
        raise FileNotFoundError(f"{spec.name}: no prepared dataset at {local} ({what}); {hint}")
    meta = read_meta(local)
    if meta is None or meta.get("format") != FORMAT:
        raise FileNotFoundError(f"{spec.name}: {spec.where} holds MDS shards but no {META_FILE} from "
                                f"data.prepare (an interrupted prepare?); {hint}")
    if meta["seq_len"] != seq_len:
        raise ValueError(
            f"seq_len mismatch: training asks for seq_len={seq_len} but {spec.where} ({spec.name}) was prepared "
            f"with seq_len={meta['seq_len']} ({META_FILE}); prepare again with --seq-len {seq_len} "
            f"or set data.seq_len={meta['seq_len']}")
    if vocab_size is not None and vocab_size < meta["vocab_size"]:
        raise ValueError(
            f"vocab_size mismatch: the model has vocab_size={vocab_size} but {spec.where} ({spec.name}) was "
            f"tokenized with {meta['tokenizer']} (vocab_size={meta['vocab_size']}, {META_FILE})")
    index = json.loads((local / "index.json").read_text())
    shards = index.get("shards", [])
    if not shards or sum(s.get("samples", 0) for s in shards) == 0:
        raise ValueError(f"{spec.name}: the stream at {spec.where} is empty (index.json lists no samples)")
    if not spec.remote:
        _check_local_shards(local, shards, spec.name)
    return meta


def _check_local_shards(local: Path, shards: list[dict], name: str) -> None:
    """Every shard of index.json is on disk (raw, or compressed) with the recorded size."""
    for shard in shards:
        candidates = [(shard[k]["basename"], shard[k]["bytes"]) for k in ("raw_data", "zip_data") if shard.get(k)]
        present = [(f, n) for f, n in candidates if (local / f).is_file()]
        if not present:
            raise FileNotFoundError(f"{name}: shard {candidates[0][0]} listed in {local / 'index.json'} is "
                                    f"missing; prepare the dataset again")
        for filename, size in present:
            actual = (local / filename).stat().st_size
            if actual != size:
                raise ValueError(f"{name}: shard {local / filename} is corrupt: {actual} bytes, index.json says "
                                 f"{size}; prepare the dataset again")


def to_streaming(specs: Sequence[StreamSpec]) -> list:
    """streaming.Stream objects for StreamingDataset(streams=...)."""
    from streaming import Stream

    return [Stream(remote=s.remote, local=str(Path(s.local).resolve()), proportion=s.proportion,
                   repeat=s.repeat, choose=s.choose) for s in specs]
