"""Fault-tolerant checkpoints: sharded (megatron dist_checkpointing, torch_dist), async, atomic, verified.

    ckpt = Checkpointer(cfg, derived, dist_info)
    ckpt.resume(trainer)                  # checkpoint.resume: auto (newest intact) | none | a path
    while ...:
        if ckpt.at_step_boundary(trainer):   # collective: async-save progress, signals, interval saves
            return REQUEUE_EXIT_CODE         # a signal arrived: every rank saved; requeue me (42)
        trainer.train_step()
    ckpt.save(trainer, blocking=True); ckpt.close()

Saving (every rank, at a step boundary): the state (pretrain.checkpoint_state) is written into
checkpoints/.tmp-step_XXXXXXXX-<id>/; with checkpoint.async_save the shards are written by a forked
process (megatron's async path: a copy-on-write snapshot, so training goes on) and at most one save is
in flight. When every rank has finished, the ranks hash the files, rank 0 writes the completion marker
with the checksums, renames the directory to step_XXXXXXXX (atomic) and replaces `latest`
(atomic), then applies keep_last / keep_every. A save that fails is reported and removed; earlier
checkpoints are never touched, and a killed save leaves only a .tmp-* directory that is never loaded.

Resuming verifies the checksums (the files are shared out over the ranks) and falls back from a corrupt
or truncated newest checkpoint to the previous complete one, naming the bad file. A checkpoint saved
under another parallel layout loads through dist_checkpointing's resharding; what cannot be changed
(the model's shapes) stops with a message naming the keys.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import checkpoint_files as files
from pretrain import checkpoint_state as state
from pretrain.checkpoint_files import CheckpointError
from pretrain.config import as_dict, from_yaml_text, to_yaml
from pretrain.distributed import collective_device
from pretrain.signals import REQUEUE_EXIT_CODE, install_process_flag

log = logging.getLogger("pretrain")

__all__ = ["Checkpointer", "CheckpointError", "REQUEUE_EXIT_CODE", "verify_main", "truncate_metrics"]


# ----------------------------------------------------------------------------------------------- collectives
def ensure_process_group() -> bool:
    """dist_checkpointing needs a process group; a single-process run gets a private 1-rank gloo one.
    Returns True when this call created it (the caller destroys it)."""
    if dist.is_initialized():
        return False
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _broadcast(obj):
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj) -> list:
    if _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _kill_writer_children(async_caller) -> None:
    """Kill the worker processes a background writer forked (megatron's file system writer starts its
    own): its caller's abort kills only the writer, which would leave them running, stuck like it."""
    import psutil

    process = getattr(async_caller, "process", None)
    if process is None or process.pid is None:
        return
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _install_cpu_compat() -> None:
    """megatron's save path calls torch.cuda.synchronize/current_device; parallel.cpu_compat stands in on CPU."""
    if torch.cuda.is_available():
        return
    from parallel import cpu_compat

    cpu_compat.install()


# ----------------------------------------------------------------------------------------------- metrics
def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Cut metrics.jsonl after the last record with step <= `step` (and any torn last line), in place,
    so a resumed run logs every step exactly once. Returns the number of records dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    keep_end, dropped, offset = 0, 0, 0
    for line in data.splitlines(keepends=True):
        end = offset + len(line)
        try:
            record = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            record = None
        if record is None or record.get("step", 0) > step:
            dropped += 1
        elif dropped == 0:
            keep_end = end
        offset = end
    if keep_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep_end)
            f.flush()
            os.fsync(f.fileno())
    return dropped


# ----------------------------------------------------------------------------------------------- saver
@dataclass
class _PendingSave:
    step: int
    tmp_dir: Path
    started: float
    reason: str


class Checkpointer:
    def __init__(self, cfg, derived, dist_info):
        self.cfg, self.derived, self.dist_info = cfg, derived, dist_info
        self.ccfg = cfg.checkpoint
        self.root = Path(derived.checkpoint_dir)
        self.own_group = ensure_process_group()
        self.rank, self.world = _rank(), _world()
        self.flag = install_process_flag(self.ccfg.signals)
        self.pending: _PendingSave | None = None
        self.queue = None
        self.last_saved_step: int | None = None  # newest step saved (published or in flight)
        self.start_step = 0
        self.last_save_time = time.monotonic()
        self.failed_saves = 0
        self.layout = state.layout_of(cfg, derived)
        self.config_yaml = to_yaml(cfg)
        self._closed = False
        self._check_socket_dir()
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        _barrier()

    def _check_socket_dir(self) -> None:
        """Stops every rank at the start, not at the first save, when a rank's TMPDIR is too long for
        the socket every save opens (files.socket_dir_problem)."""
        import multiprocessing.util

        problem = files.socket_dir_problem(multiprocessing.util.get_temp_dir())
        problems = [p for p in _all_gather(None if problem is None else f"rank {self.rank}: {problem}") if p]
        if problems:
            raise CheckpointError("; ".join(problems))

    # ------------------------------------------------------------------------------------------- state
    def _sharded_state(self, trainer) -> dict:
        model_sd = state.model_sharded_state_dict(trainer.model, replica_id=self.rank)
        opt = state.optimizer_sharded_state_dict(trainer.optimizer, trainer.model, model_sd, replica_id=self.rank)
        return {
            "model": model_sd,
            "optimizer": opt,
            "rng": state.rng_sharded_object(self.rank, self.world, state.rng_state()),
            "trainer": {"step": trainer.step, "consumed_samples": trainer.consumed_samples,
                        "consumed_tokens": trainer.consumed_samples * self.cfg.data.seq_len,
                        "total_steps": self.derived.total_steps},
            "data": trainer.loader.state_dict(),
            "layout": self.layout,
            "config_yaml": self.config_yaml,
            "versions": state.code_versions(),
        }

    def _sharded_state_on_every_rank(self, trainer) -> dict:
        """This rank's sharded state, once every rank has built its own (collective): a rank that fails
        here would otherwise leave the others waiting in the save's collectives for ever."""
        try:
            sharded, error = self._sharded_state(trainer), None
        except Exception as err:  # noqa: BLE001 - every rank learns of it below
            sharded, error = None, err
        failures = [f for f in _all_gather(None if error is None else f"rank {self.rank}: {type(error).__name__}: {error}")
                    if f is not None]
        if error is not None:
            raise error
        if failures:
            raise CheckpointError("collecting the state to save failed on " + "; ".join(failures))
        return sharded

    # ------------------------------------------------------------------------------------------- saving
    def save(self, trainer, *, blocking: bool, reason: str = "interval") -> bool:
        """Save the trainer's state at its current step (collective). Returns False if the save failed
        (only known here when blocking)."""
        from megatron.core import dist_checkpointing

        _install_cpu_compat()
        self.wait()  # at most one save in flight
        step = trainer.step
        name = files.step_dir_name(step)
        tmp_name = _broadcast(f"{files.TMP_PREFIX}{name}-{os.getpid()}-{time.time_ns()}" if self.rank == 0 else None)
        tmp_dir = self.root / tmp_name
        if self.rank == 0:
            tmp_dir.mkdir(parents=True)
        _barrier()
        started = time.monotonic()
        self.last_saved_step = step
        self.last_save_time = started
        try:
            sharded = self._sharded_state_on_every_rank(trainer)
            request = dist_checkpointing.save(sharded, str(tmp_dir), async_sharded_save=True)
            request.add_finalize_fn(lambda: self._publish(step, tmp_dir, started, reason))
            if blocking or not self.ccfg.async_save:
                request.execute_sync()
            else:
                if self.queue is None:
                    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

                    self.queue = AsyncCallsQueue(persistent=False)
                self.queue.schedule_async_request(request)
                self.pending = _PendingSave(step, tmp_dir, started, reason)
                log.info("checkpoint step %d: writing in the background (%s)", step, tmp_dir.name)
                return True
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - reported; training goes on with earlier checkpoints intact
            self._failed(step, tmp_dir, err)
            return False
        return True

    def _publish(self, step: int, tmp_dir: Path, started: float, reason: str) -> None:
        """Runs on every rank once every rank's shards are on disk: checksums, marker, rename, latest."""
        if self.rank == 0:
            (tmp_dir / "config.yaml").write_text(self.config_yaml)
            trainer_state = {"step": step, "reason": reason, "time": time.time(), "layout": self.layout,
                             "versions": state.code_versions()}
            (tmp_dir / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
        names = _broadcast(files.list_files(tmp_dir) if self.rank == 0 else None)
        mine = [n for i, n in enumerate(names) if i % self.world == self.rank]
        digests = {}
        for part in _all_gather(files.digest_files(tmp_dir, mine)):
            digests.update(part)
        error = None
        final = self.root / files.step_dir_name(step)
        if self.rank == 0:
            try:
                files.write_marker(tmp_dir, step, digests, {"layout": self.layout})
                if final.exists():
                    files.remove_tree(final)  # a stale or corrupt copy of this step (after a fallback)
                os.rename(tmp_dir, final)
                files.fsync_dir(self.root)
                files.write_latest(self.root, step)
                self._apply_retention(protect=step)
            except Exception as err:  # noqa: BLE001 - every rank must learn of it, not hang in the barrier
                error = f"{type(err).__name__}: {err}"
        error = _broadcast(error)
        if error:
            raise CheckpointError(f"publishing checkpoint step {step} failed: {error}")
        size = sum(d["size"] for d in digests.values())
        log.info("saved checkpoint %s (step %d, %s, %.1f MB, %.1fs)", final, step, reason, size / 2**20,
                 time.monotonic() - started)

    def _apply_retention(self, protect: int) -> None:
        complete = files.list_checkpoints(self.root)
        latest = files.read_latest(self.root)
        keep = {protect} | ({files.step_of(latest)} if latest is not None else set())
        for step in files.retention_victims([c.step for c in complete], self.ccfg.keep_last, self.ccfg.keep_every, keep):
            files.remove_tree(self.root / files.step_dir_name(step))

    def _failed(self, step: int, tmp_dir: Path, err: BaseException) -> None:
        self.failed_saves += 1
        self.pending = None
        self.last_saved_step = None
        log.error("checkpoint step %d FAILED (%s: %s); training continues, earlier checkpoints are intact",
                  step, type(err).__name__, err, exc_info=err)
        if self.rank == 0:
            files.remove_tree(tmp_dir)

    def poll(self) -> None:
        """Finalize a background save that has finished on every rank (collective; cheap when none)."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        """Block until the save in flight (if any) is published or has failed (collective)."""
        self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        """Publish the save in flight once every rank's writer is done. A writer that hangs (megatron waits
        without a timeout for its worker processes, e.g. one killed by the OOM killer) is aborted after
        checkpoint.async_timeout_minutes and reported as a failed save."""
        while self.pending is not None:
            pending = self.pending
            try:
                done = self.queue.maybe_finalize_async_calls(blocking=False)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as err:  # noqa: BLE001 - torch's CheckpointException is a BaseException
                self._failed(pending.step, pending.tmp_dir, err)
                return
            if done:
                self.pending = None
                return
            limit = 60 * self.ccfg.async_timeout_minutes
            expired = _broadcast(self.rank == 0 and limit > 0 and time.monotonic() - pending.started > limit)
            if expired:
                for call in list(self.queue.async_calls):
                    _kill_writer_children(call.async_caller)
                    call.async_caller.close(abort=True)
                self.queue.async_calls.clear()
                self._failed(pending.step, pending.tmp_dir, TimeoutError(
                    f"the background writer did not finish within checkpoint.async_timeout_minutes="
                    f"{self.ccfg.async_timeout_minutes}; it was killed"))
                return
            if not blocking:
                return
            time.sleep(0.05)

    # ------------------------------------------------------------------------------------------- loop
    def at_step_boundary(self, trainer) -> bool:
        """Called by every rank between steps. Finalizes finished background saves, agrees on signals
        (all-reduce MAX) and the time interval, saves when due. True: a signal asked to stop; the
        checkpoint of this step is on disk and the caller exits with REQUEUE_EXIT_CODE."""
        self.poll()
        step = trainer.step
        time_due = (self.ccfg.interval_minutes > 0 and self.rank == 0
                    and time.monotonic() - self.last_save_time >= 60 * self.ccfg.interval_minutes)
        flags = torch.tensor([int(self.flag.is_set), int(time_due)], dtype=torch.int64)
        if self.world > 1:  # on NCCL a CUDA tensor: reading it waits for this step's GPU work (once a step)
            flags = flags.to(collective_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signalled, time_due = bool(flags[0]), bool(flags[1])
        if signalled:
            if self.rank == 0 or self.flag.is_set:
                log.warning("signal received (%s): saving a checkpoint at step %d on every rank, then exiting %d",
                            self.flag.describe() if self.flag.is_set else "on another rank", step, REQUEUE_EXIT_CODE)
            self.wait()
            if self.last_saved_step != step:
                self.save(trainer, blocking=True, reason="signal")
            return True
        if step >= self.derived.total_steps or step == self.start_step:
            return False
        interval_due = self.ccfg.interval > 0 and step % self.ccfg.interval == 0
        if interval_due or time_due:
            self.save(trainer, blocking=False, reason="interval" if interval_due else "time")
        return False

    def finish(self, trainer) -> None:
        """The end of training: the final checkpoint (unless this step is saved already), all saves done."""
        if self.last_saved_step != trainer.step:
            self.save(trainer, blocking=True, reason="final")
        self.wait()

    def close(self, abort: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if self.queue is not None:
            if abort:
                self.queue.close(abort=True)
            else:
                self.wait()
                self.queue.close()
        if self.own_group and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------------------------------- resume
    def _verify(self, path: Path) -> list[str]:
        """Every rank hashes a share of the files; all ranks get the full list of problems."""
        problems = files.marker_problems(path) if self.rank == 0 else None
        problems = _broadcast(problems)
        if problems or not self.ccfg.verify_on_load:
            return problems
        marker = files.read_marker(path)
        names = sorted(marker["files"])
        mine = [n for i, n in enumerate(names) if i % self.world == self.rank]
        found = []
        for part in _all_gather(files.checksum_problems(path, mine)):
            found += part
        return found

    def candidates(self) -> tuple[list[Path], bool]:
        """(checkpoints to try, newest first; whether the user named one explicitly)."""
        mode = self.ccfg.resume
        if mode == "none":
            return [], False
        if mode == "auto":
            complete = files.list_checkpoints(self.root)
            latest = files.read_latest(self.root)
            if latest is not None and complete and latest.name != complete[-1].name:
                log.info("checkpoints/latest names %s; the newest complete checkpoint is %s", latest.name,
                         complete[-1].name)
            return [c.path for c in reversed(complete)], False
        return [files.resolve_checkpoint_path(mode)], True

    def resume(self, trainer) -> int | None:
        """Load the checkpoint that checkpoint.resume selects into the trainer (collective).
        Returns the step resumed from, or None for a fresh start."""
        if self.rank == 0:
            stale = files.clean_stale(self.root)
            if stale:
                log.info("removed %d unfinished save(s) of an earlier run: %s", len(stale), ", ".join(stale))
        _barrier()
        try:
            paths, explicit = self.candidates() if self.rank == 0 else (None, None)
            error = None
        except CheckpointError as err:
            paths, explicit, error = None, None, str(err)
        paths, explicit, error = _broadcast((paths, explicit, error))
        if error:
            raise CheckpointError(error)
        if not paths:
            log.info("%s: starting from scratch", f"no checkpoint in {self.root}" if self.ccfg.resume == "auto"
                     else "checkpoint.resume=none")
            if self.rank == 0:  # records of an earlier attempt of this run are trained again
                truncate_metrics(Path(self.derived.run_dir) / "metrics.jsonl", 0)
            return None
        bad = []
        for path in paths:
            problems = self._verify(path)
            if not problems:
                break
            bad.append((path, problems))
            if explicit:
                raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: " + "; ".join(problems))
            log.warning("checkpoint %s is incomplete or corrupt: %s -- falling back to the previous complete "
                        "checkpoint", path, "; ".join(problems))
        else:
            raise CheckpointError(
                f"no intact checkpoint in {self.root}: " + " | ".join(f"{p.name}: {'; '.join(pr)}" for p, pr in bad)
                + " -- fix or remove them, or start fresh with checkpoint.resume=none")
        step = self.load(path, trainer)
        if bad:
            log.warning("resumed from the previous complete checkpoint %s; bad: %s", path.name,
                        ", ".join(p.name for p, _ in bad))
        return step

    def _check_compatible(self, path: Path, common: dict) -> None:
        saved_cfg = from_yaml_text(common["config_yaml"])
        saved, now = as_dict(saved_cfg)["model"], as_dict(self.cfg)["model"]
        diffs = _dict_diff(saved, now, "model")
        if diffs:
            raise CheckpointError(
                f"checkpoint {path} holds a different model: " + ", ".join(diffs)
                + f" ({path / 'config.yaml'}); use the checkpoint's model config or start a new run")
        if saved_cfg.data.seq_len != self.cfg.data.seq_len or saved_cfg.data.path != self.cfg.data.path:
            log.warning("checkpoint %s was trained on data.path=%s seq_len=%d; now %s seq_len=%d: the data "
                        "order does not continue", path, saved_cfg.data.path, saved_cfg.data.seq_len,
                        self.cfg.data.path, self.cfg.data.seq_len)

    def load(self, path: Path, trainer) -> int:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.core import CheckpointingException

        common = dist_checkpointing.load_common_state_dict(str(path))
        self._check_compatible(path, common)
        saved_layout = common.get("layout", {})
        same_layout = all(saved_layout.get(k) == self.layout.get(k) for k in ("world_size", "tp", "pp", "ep", "cp", "dp"))
        if not same_layout:
            log.info("resharding checkpoint %s from %s (world %s) to %s (world %s)", path.name,
                     state.describe_layout(saved_layout), saved_layout.get("world_size"),
                     state.describe_layout(self.layout), self.layout["world_size"])
        model_sd = state.model_sharded_state_dict(trainer.model, replica_id=self.rank)
        saved_opt = common.get("optimizer")
        template = {
            "model": model_sd,
            "optimizer": state.optimizer_sharded_state_dict(trainer.optimizer, trainer.model, model_sd,
                                                            replica_id=self.rank, is_loading=True, saved=saved_opt,
                                                            saved_keys=_tensor_keys(path)),
        }
        if saved_layout.get("world_size") == self.world:
            template["rng"] = state.rng_sharded_object(self.rank, self.world, None)
        try:
            loaded = dist_checkpointing.load(template, str(path))
        except (CheckpointingException, KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"cannot load checkpoint {path} (saved with {state.describe_layout(saved_layout)}) under "
                f"{state.describe_layout(self.layout)}: {type(err).__name__}: {err}") from err
        try:
            state.load_model_state(trainer.model, loaded["model"])
            state.load_optimizer_state(trainer.optimizer, trainer.model, loaded["optimizer"], saved_opt,
                                       loaded["model"])
        except (KeyError, ValueError, RuntimeError) as err:
            log.debug("loading %s failed", path, exc_info=err)
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {type(err).__name__}: {err}") from err
        if "rng" in template:
            state.set_rng_state(loaded["rng"])
        else:
            log.warning("RNG states not restored: %s was saved by %s ranks, this run has %d (each rank seeds anew)",
                        path.name, saved_layout.get("world_size"), self.world)
        t = common["trainer"]
        trainer.step = int(t["step"])
        trainer.consumed_samples = int(t["consumed_samples"])
        if common.get("data") is not None:
            trainer.loader.load_state_dict(common["data"])
            from data.dataset import infinite_batches

            trainer.batches = infinite_batches(trainer.loader)
        self.start_step = self.last_saved_step = trainer.step
        if self.rank == 0:
            dropped = truncate_metrics(Path(self.derived.run_dir) / "metrics.jsonl", trainer.step)
            if dropped:
                log.info("metrics.jsonl: dropped %d record(s) after step %d (they are trained again)", dropped,
                         trainer.step)
        log.info("resumed from %s at step %d (%d samples, %d tokens consumed)", path, trainer.step,
                 trainer.consumed_samples, trainer.consumed_samples * self.cfg.data.seq_len)
        _barrier()
        return trainer.step


def _tensor_keys(path: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def _dict_diff(a, b, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _dict_diff(a.get(key), b.get(key), f"{prefix}.{key}")
        return out
    return [] if a == b else [f"{prefix}={a!r} in the checkpoint, {b!r} now"]


# ----------------------------------------------------------------------------------------------- --verify
def verify_main(target: str) -> int:
    """`python -m pretrain.train --verify <checkpoint | checkpoints dir | run dir>`: check offline."""
    p = Path(target)
    if p.is_dir() and not files.is_checkpoint_dir(p) and (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.name == files.LATEST and p.is_file():
        p = files.resolve_checkpoint_path(p)
    if p.is_dir() and not files.is_checkpoint_dir(p) and any(files.step_of(e) is not None for e in p.iterdir()):
        targets = [e for e in sorted(p.iterdir()) if files.step_of(e) is not None and e.is_dir()]
    else:
        if not p.exists():
            print(f"verify: {p} does not exist")
            return 1
        targets = [p]
    bad = 0
    for path in targets:
        problems = files.verify_checkpoint(path)
        if not problems:
            problems = _verify_contents(path)
        if problems:
            bad += 1
            print(f"BAD  {path}")
            for line in problems:
                print(f"     {line}")
        else:
            marker = files.read_marker(path)
            size = sum(f["size"] for f in marker["files"].values())
            print(f"OK   {path}: step {marker['step']}, {len(marker['files'])} files, {size / 2**20:.1f} MB, "
                  f"checksums match")
    print(f"verify: {len(targets) - bad} of {len(targets)} checkpoint(s) intact")
    return 1 if bad else 0


def _verify_contents(path: Path) -> list[str]:
    """Beyond checksums: the common state and the tensor metadata parse, and name what resume needs."""
    try:
        common = torch.load(path / "common.pt", map_location="cpu", weights_only=False)
        from torch.distributed.checkpoint import FileSystemReader

        FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001
        return [f"{path}: unreadable ({type(err).__name__}: {err})"]
    missing = [k for k in ("trainer", "config_yaml", "layout") if k not in common]
    return [f"{path / 'common.pt'}: lacks {missing}"] if missing else []
