"""Preemption signals: SIGUSR1 / SIGTERM (checkpoint.signals) ask for a checkpoint, then exit 42.

The handler only records the signal; the training loop looks at the flag at every step boundary,
where all ranks agree on it (all-reduce MAX, so a signal that reached any one rank counts), save a
checkpoint together and leave with REQUEUE_EXIT_CODE, which slurm/train.sbatch answers with
`scontrol requeue`. A second signal while the checkpoint is written is recorded and otherwise
ignored: nothing is interrupted, so the save completes.

    flag = SignalFlag(["SIGUSR1", "SIGTERM"]).install()   # as early as possible in the process
    ...
    if flag.received: ...
"""
from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger("pretrain")

# "checkpointed on a signal, requeue me": the documented status that slurm/train.sbatch requeues on
REQUEUE_EXIT_CODE = 42


def signal_number(name: str) -> signal.Signals:
    """'SIGUSR1' / 'usr1' / 'SIGTERM' -> the signal (ValueError for unknown names)."""
    key = name.upper()
    if not key.startswith("SIG"):
        key = "SIG" + key
    sig = getattr(signal, key, None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"unknown signal name {name!r}")
    return sig


class SignalFlag:
    """Records which of the given signals arrived (async-signal-safe: the handler only appends)."""

    def __init__(self, names: list[str] | tuple[str, ...] = ("SIGUSR1", "SIGTERM")):
        self.signals = [signal_number(n) for n in names]
        self.received: list[int] = []
        self.first_time: float | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.received.append(signum)
        if self.first_time is None:
            self.first_time = time.time()

    def install(self) -> "SignalFlag":
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    @property
    def is_set(self) -> bool:
        return bool(self.received)

    def describe(self) -> str:
        names = [signal.Signals(s).name for s in self.received]
        return ", ".join(names) if names else "none"


_PROCESS_FLAG: SignalFlag | None = None


def install_process_flag(names: list[str] | tuple[str, ...]) -> SignalFlag:
    """The process-wide flag (one per process; installing again keeps the signals already seen)."""
    global _PROCESS_FLAG
    if _PROCESS_FLAG is None:
        _PROCESS_FLAG = SignalFlag(names).install()
    else:
        for sig in (signal_number(n) for n in names):
            if sig not in _PROCESS_FLAG.signals:
                _PROCESS_FLAG.signals.append(sig)
        _PROCESS_FLAG.install()
    log.debug("pid %d: %s request a checkpoint and exit %d", os.getpid(),
              "/".join(signal.Signals(s).name for s in _PROCESS_FLAG.signals), REQUEUE_EXIT_CODE)
    return _PROCESS_FLAG


def process_flag() -> SignalFlag | None:
    return _PROCESS_FLAG


def reset_process_flag() -> None:
    """Uninstall and forget the process-wide flag (tests that run several trainers in one process)."""
    global _PROCESS_FLAG
    if _PROCESS_FLAG is not None:
        _PROCESS_FLAG.uninstall()
    _PROCESS_FLAG = None
