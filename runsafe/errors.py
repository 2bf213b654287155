"""One-line errors (`NAME.py: error: ...`, exit status 2) for train.py and every tool, argparse
number types, and output that never stops a run."""

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time


class RunError(Exception):
    """Bad input, or a run that cannot go on: one line, exit status `status`."""
    status = 2


class FolderInUse(RunError):
    status = 3  # the run folder is locked by a live train.py: a sweep can tell


class Stopped(RunError):
    status = 0  # a clean end before training began (a stop signal, a finished run)


def number(kind, check, what):
    """An argparse type: a finite `kind` (int or float) for which check(value) holds."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}"
                                             f": {text!r}") from None
        if not (math.isfinite(value) and check(value)):
            raise argparse.ArgumentTypeError(f"{text}: must be {what}")
        return value
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": such helps say the default
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise RunError(message)


class QuietStream:
    """sys.stdout or sys.stderr whose write errors (its reader gone: `| tee` killed by Ctrl-C, a
    closed terminal) never stop the run: from the first, it writes to /dev/null."""

    def __init__(self, stream):
        self.stream = stream

    def _quiet(self, call, *args):
        try:
            call(*args)
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def write(self, text):
        self._quiet(self.stream.write, text)
        return len(text)

    def flush(self):
        self._quiet(self.stream.flush)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def run_cli(main, name, argv=None):
    """main(argv), with a RunError reported as one line `NAME: error: ...` (by rank 0 only under
    torchrun, which also shows it as the root cause) and its exit status, never a traceback; a
    second Ctrl-C is status 130. Output piped to a reader that stops early (`report | head`) ends
    quietly."""
    rank_0 = int(os.environ.get("RANK", 0)) == 0
    try:
        status = main(argv)
        sys.stdout.flush()  # a reader gone shows here, not as a traceback at the exit
        return status
    except RunError as e:
        line = f"{name}: {e}" if e.status == 0 else f"{name}: error: {e}"
        if e.status and os.environ.get("TORCHELASTIC_ERROR_FILE"):
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump({"message": {"message": line, "extraInfo": {
                    "py_callstack": line, "timestamp": str(int(time.time()))}}}, f)
        if rank_0:
            print(line, file=sys.stderr if e.status else sys.stdout, flush=True)
        return e.status
    except KeyboardInterrupt:
        if rank_0:
            print(f"\n{name}: aborted (Ctrl-C again)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flushes
        return 128 + signal.SIGPIPE
