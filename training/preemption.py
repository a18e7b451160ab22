"""Preemption: stop signals become a checkpoint after the current step, on every process alike."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _stop_with_one_process_launcher() -> None:
    """accelerate's one-process launcher neither relays signals nor stops its child, so a
    SIGTERM to it alone (the job's main pid) would leave the trainer orphaned, training on.
    Under it, Linux is asked to send the trainer SIGTERM when the launcher dies: the handler
    then checkpoints and exits 0 like any preemption. (torchrun's agent, used for several
    processes, relays signals itself.)"""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" in os.environ:
        return
    parent = os.getppid()
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if not (any(a.endswith(b"accelerate") for a in cmdline[:2]) and b"launch" in cmdline):
        return
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


class Preemption:
    """SIGTERM and SIGUSR1, which SLURM, Kubernetes and spot instances send some time before
    they kill a job, only set a flag here; the loop then finishes its optimizer step, writes a
    resume checkpoint and exits 0 (OptimizerStep.stop_if_requested). The flag is all-reduced
    once per step (OptimizerStep.finish), so every process stops after the same step even when
    the signal reached only one of them, or each at another moment. A second signal changes
    nothing: torchrun relays the SIGTERM it got to workers that may have had theirs already.

    Hand-written: accelerate and torch have no such hook (torchrun's agent only relays the
    signal, then kills its workers after TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")
    _installed = None  # the process's active instance; a new run's replaces one left behind

    def __init__(self):
        self.received: int | None = None  # the first signal's number
        self._previous: dict = {}

    def install(self) -> "Preemption":
        import threading
        if threading.current_thread() is not threading.main_thread():
            return self  # Python runs signal handlers in the main thread only
        if Preemption._installed is not None:
            Preemption._installed.restore()
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)  # Windows has no SIGUSR1
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        Preemption._installed = self
        _stop_with_one_process_launcher()
        return self

    def _handle(self, signum, frame) -> None:
        self.received = self.received or int(signum)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        if Preemption._installed is self:
            Preemption._installed = None
