"""Stop signals, caught from train.py's first line (stdlib only: before torch loads).

SIGINT, SIGTERM, SIGHUP (the terminal closed) and SIGUSR1 (Slurm's --signal=USR1@...) all ask
the run to stop at its next check, with a checkpoint. Repeats change nothing (Slurm and torchrun
may each send one) except a second SIGINT: Ctrl-C again aborts, though never in the middle of a
checkpoint write, which finishes first. DataLoader workers inherit the handler and ignore it."""

import contextlib
import os
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
_state = {"signal": None, "pid": None, "writing": False, "abort": False}


def catch():
    """From now on, the signals above set requested() (in this process, not its children)."""
    _state.update(signal=None, pid=os.getpid(), writing=False, abort=False)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)


def requested():
    """The name of the first stop signal this process got, or None."""
    return _state["signal"]


def _say(text):  # os.write: print() inside a signal handler can hit a reentrant-call error
    if int(os.environ.get("RANK", 0)) == 0:
        with contextlib.suppress(OSError):
            os.write(2, f"\n{text}\n".encode())


def _on_signal(signum, frame):
    if os.getpid() != _state["pid"]:  # a forked child (a DataLoader worker): its parent decides
        return
    name = signal.Signals(signum).name
    if _state["signal"] is None:
        _state["signal"] = name
        _say(f"{name}: stopping at the next check (at most 20 steps), with a checkpoint "
             f"(Ctrl-C again aborts)")
    elif signum == signal.SIGINT and _state["writing"]:
        _state["abort"] = True
        _say("Ctrl-C again: aborting once the checkpoint being written is complete")
    elif signum == signal.SIGINT:
        raise KeyboardInterrupt
    else:
        _say(f"{name} again: the stop is under way (Ctrl-C aborts)")


@contextlib.contextmanager
def no_abort():
    """A second Ctrl-C inside waits until the block is done (a file written whole), then aborts."""
    _state["writing"] = True
    try:
        yield
    finally:
        _state["writing"] = False
    if _state["abort"]:
        raise KeyboardInterrupt


@contextlib.contextmanager
def caught():
    """catch() inside, unless this process catches already (from train.py's first line); the
    handlers from before come back after (pytest's, when train.cli runs in a test)."""
    if _state["pid"] == os.getpid():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    catch()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _state["pid"] = None


def ignore_in_worker(worker_id):
    """A DataLoader worker's worker_init_fn: stop signals are its parent's to act on. torchrun
    and Slurm signal every process of a rank, and PyTorch's workers would die of SIGTERM."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
