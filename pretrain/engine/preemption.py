"""Preemption: a signal only raises a flag; the training loop acts on it at the next step boundary, where all ranks
agree (any rank flagged -> every rank saves, then the stage returns "preempted"). Saving inside the signal handler
would interrupt collectives mid-flight and deadlock the ranks."""
import signal
import threading

_stop = threading.Event()
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def request_stop(*_):
    """Ask the training loop for a coordinated checkpoint and an orderly exit at the next step boundary."""
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def install_handlers():
    """A stop requested before the handlers exist (e.g. by a launcher's own handler) stays requested."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, request_stop)
