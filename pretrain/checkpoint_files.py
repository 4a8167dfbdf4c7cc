"""Checkpoint directory layout, completion marker, checksums, `latest`, retention: files only, no torch.

    runs/<name>/checkpoints/
        step_00001000/                  one complete checkpoint (published by an atomic rename)
            .metadata, __<rank>_<n>.distcp, common.pt, metadata.json    megatron dist_checkpointing (torch_dist)
            config.yaml                 the resolved config of the run that wrote it
            trainer_state.json          step, consumed samples/tokens, layout, versions (for people)
            checkpoint_complete.json    the completion marker: size and sha256 of every other file
        latest                          text file: "step_00001000\\n", replaced atomically after a publish
        .tmp-step_00002000-<id>/        a save in progress (or one that died): never loaded, cleaned up
        .trash-...                      a checkpoint being deleted by retention

A directory named step_* without a valid marker is never loaded. `verify_checkpoint` recomputes
the checksums (a corrupt or truncated file is named in the returned problems). `socket_dir_problem`
says whether megatron's save path can open its UNIX socket under the temporary directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

MARKER = "checkpoint_complete.json"
LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d{8,})$")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
# files every torch_dist checkpoint has; a marker that lists none of them is not ours
REQUIRED_FILES = ("metadata.json", ".metadata", "common.pt")
# the longest path a UNIX socket can be bound at (Linux's sun_path is 108 bytes; Python allows 107)
MAX_SOCKET_PATH = 107
# what multiprocessing adds to TMPDIR for a Manager's socket: /pymp-XXXXXXXX/listener-XXXXXXXX
SOCKET_NAME_LEN = len("/listener-") + 8
MAX_TMPDIR = MAX_SOCKET_PATH - SOCKET_NAME_LEN - len("/pymp-") - 8  # 75 bytes


class CheckpointError(RuntimeError):
    """A checkpoint problem the user can act on; the message names the file."""


def socket_dir_problem(mp_temp_dir: str) -> str | None:
    """Every save (megatron's dist_checkpointing.save with async_sharded_save, also when run
    synchronously) starts a multiprocessing Manager, whose UNIX socket is bound at
    <multiprocessing's temp dir>/listener-XXXXXXXX; that dir is TMPDIR/pymp-XXXXXXXX. A path over
    MAX_SOCKET_PATH bytes cannot be bound and every save would fail (an EOFError from the Manager).
    mp_temp_dir: multiprocessing.util.get_temp_dir(). -> what is wrong, or None."""
    length = len(os.fsencode(mp_temp_dir)) + SOCKET_NAME_LEN
    if length <= MAX_SOCKET_PATH:
        return None
    return (f"checkpoints cannot be saved with this temporary directory: megatron's save opens a UNIX "
            f"socket under {mp_temp_dir}, a {length}-byte path where at most {MAX_SOCKET_PATH} can be bound; "
            f"set TMPDIR to a directory of at most {MAX_TMPDIR} bytes (it is {os.path.dirname(mp_temp_dir)})")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: str | os.PathLike) -> int | None:
    m = STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a sibling temp file, fsync, then os.replace over `path` (and fsync the dir)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ----------------------------------------------------------------------------------------------- checksums
def file_digest(path: str | os.PathLike, chunk: int = 8 << 20) -> tuple[int, str]:
    """(size, sha256 hex) of a file; also fsyncs it so the marker never precedes its data."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
        try:
            os.fsync(f.fileno())
        except OSError:
            pass
    return size, h.hexdigest()


def list_files(ckpt_dir: str | os.PathLike) -> list[str]:
    """Relative paths of every file under ckpt_dir except the marker, sorted."""
    root = Path(ckpt_dir)
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MARKER:
                out.append(rel)
    return sorted(out)


def digest_files(ckpt_dir: str | os.PathLike, rel_paths: list[str]) -> dict[str, dict]:
    return {rel: dict(zip(("size", "sha256"), file_digest(Path(ckpt_dir) / rel))) for rel in rel_paths}


def write_marker(ckpt_dir: str | os.PathLike, step: int, files: dict[str, dict], extra: dict | None = None) -> None:
    """The completion marker: written last, after every file it lists is on disk."""
    body = {"format": "hybrid-pretrain/checkpoint", "version": 1, "step": step, "time": time.time(),
            "files": files, **(extra or {})}
    write_atomic(Path(ckpt_dir) / MARKER, json.dumps(body, indent=1, sort_keys=True) + "\n")


def read_marker(ckpt_dir: str | os.PathLike) -> dict | None:
    try:
        body = json.loads((Path(ckpt_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and isinstance(body.get("files"), dict) else None


def marker_problems(ckpt_dir: str | os.PathLike) -> list[str]:
    """Cheap checks (no hashing): marker present and parsable, every listed file present with its size."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return [f"{ckpt_dir}: not a directory"]
    marker = read_marker(ckpt_dir)
    if marker is None:
        what = "missing" if not (ckpt_dir / MARKER).exists() else "unreadable"
        return [f"{ckpt_dir / MARKER}: completion marker {what} (the save never finished)"]
    problems = []
    missing_required = [f for f in REQUIRED_FILES if f not in marker["files"]]
    if missing_required:
        problems.append(f"{ckpt_dir / MARKER}: lists none of {missing_required}")
    for rel, info in marker["files"].items():
        path = ckpt_dir / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != info["size"]:
            problems.append(f"{path}: truncated or resized ({path.stat().st_size} bytes, expected {info['size']})")
    return problems


def checksum_problems(ckpt_dir: str | os.PathLike, rel_paths: list[str] | None = None) -> list[str]:
    """Hash the files (all listed in the marker, or the given subset) and name every mismatch."""
    ckpt_dir = Path(ckpt_dir)
    marker = read_marker(ckpt_dir)
    if marker is None:
        return [f"{ckpt_dir / MARKER}: completion marker missing or unreadable"]
    problems = []
    for rel in (rel_paths if rel_paths is not None else sorted(marker["files"])):
        info = marker["files"][rel]
        path = ckpt_dir / rel
        try:
            size, sha = file_digest(path)
        except OSError as err:
            problems.append(f"{path}: unreadable ({err.strerror or err})")
            continue
        if size != info["size"]:
            problems.append(f"{path}: truncated or resized ({size} bytes, expected {info['size']})")
        elif sha != info["sha256"]:
            problems.append(f"{path}: checksum mismatch (corrupt): sha256 {sha[:12]}..., expected {info['sha256'][:12]}...")
    return problems


def verify_checkpoint(ckpt_dir: str | os.PathLike, hash_files: bool = True) -> list[str]:
    """All problems of one checkpoint directory ([] = complete and intact)."""
    problems = marker_problems(ckpt_dir)
    if problems or not hash_files:
        return problems
    return checksum_problems(ckpt_dir)


# ----------------------------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path

    @property
    def name(self) -> str:
        return self.path.name


def list_checkpoints(checkpoint_dir: str | os.PathLike, complete_only: bool = True) -> list[CheckpointInfo]:
    """step_* directories (with a completion marker when complete_only), oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        step = step_of(entry)
        if step is None or not entry.is_dir():
            continue
        if complete_only and not (entry / MARKER).is_file():
            continue
        found.append(CheckpointInfo(step, entry))
    return sorted(found, key=lambda c: c.step)


def read_latest(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The directory `latest` names (None when there is no `latest`)."""
    path = Path(checkpoint_dir) / LATEST
    try:
        name = path.read_text().strip()
    except OSError:
        return None
    return Path(checkpoint_dir) / name if name else None


def write_latest(checkpoint_dir: str | os.PathLike, step: int) -> None:
    write_atomic(Path(checkpoint_dir) / LATEST, step_dir_name(step) + "\n")


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).exists() or (Path(path) / "metadata.json").exists()


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint directory from what a user may pass: the directory, `.../latest`, or a run's checkpoints/."""
    p = Path(path)
    if p.name == LATEST and p.is_file():
        target = read_latest(p.parent)
        if target is None:
            raise CheckpointError(f"{p} is empty")
        return target
    if p.is_dir() and not is_checkpoint_dir(p):
        target = read_latest(p)
        if target is not None:
            return target
        complete = list_checkpoints(p)
        if complete:
            return complete[-1].path
        if (p / "checkpoints").is_dir():
            return resolve_checkpoint_path(p / "checkpoints")
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


# ----------------------------------------------------------------------------------------------- cleanup
def retention_victims(steps: list[int], keep_last: int, keep_every: int, protect: set[int] = frozenset()) -> list[int]:
    """Steps to delete: all but the newest `keep_last`, the multiples of `keep_every`, and `protect`."""
    ordered = sorted(steps)
    keep = set(ordered[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {s for s in ordered if s % keep_every == 0}
    keep |= set(protect)
    return [s for s in ordered if s not in keep]


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory so that it vanishes at once: rename to .trash-*, then rmtree."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}-{time.time_ns()}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(checkpoint_dir: str | os.PathLike) -> list[str]:
    """Remove saves that never finished (.tmp-*) and half-deleted ones (.trash-*) of earlier runs."""
    root = Path(checkpoint_dir)
    removed = []
    if not root.is_dir():
        return removed
    for entry in root.iterdir():
        if entry.name.startswith((TMP_PREFIX, TRASH_PREFIX)) or entry.name.startswith(f".{LATEST}.tmp-"):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                try:
                    entry.unlink()
                except OSError:
                    pass
            removed.append(entry.name)
    return removed
