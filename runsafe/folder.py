"""The run folder: args.jsonl (one line per invocation), log.jsonl (one line per epoch),
checkpoint.pt, best.pt. Every file is replaced whole (written aside, synced, renamed), so a full
disk or a kill never leaves a torn file; the folder is locked while a train.py writes it."""

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile

from . import signals
from .errors import FolderInUse, RunError

_held = []  # the file descriptors of the run folder's locks
# flock locks follow the open file into forked children (DataLoader workers), which would hold
# the folder for seconds after their parent was killed: children close their copies at once.
os.register_at_fork(after_in_child=lambda: [os.close(fd) for fd in _held])


def save_atomic(path, write):
    """write(f) into PATH.tmp, synced, then renamed to PATH: the previous version stays whole
    until the new one is, and a second Ctrl-C waits for it."""
    tmp = f"{path}.tmp"
    try:
        with signals.no_abort(), open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException as e:  # torch.save reports a failed write as a RuntimeError (of an OSError)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        room = " (it needs room for the old and the new file at once)" if cause.errno in (
            errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
        raise RunError(f"cannot write {path} ({cause.strerror or cause}){room}; the previous "
                       f"version, if any, is intact") from None


def write_lines(path, records):
    """PATH holds exactly `records`, one JSON line each."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    save_atomic(path, lambda f: f.write(text.encode()))


def read_lines(path):
    """The JSON records of a .jsonl file ([] if there is none)."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: cannot read it ({e})") from None


def append_line(path, record):
    """Appends one JSON line in one O_APPEND write: writers at the same time (a sweep's Slurm
    tasks, each adding its outcome to one file) neither lose nor mix their lines."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise RunError(f"cannot write {path} ({e.strerror or e})") from None


def lock(folder):
    """Locks the run folder while this process lives: a second train.py on it (a job submitted
    twice) is refused with FolderInUse. Two locks: flock on the folder itself, which no deleted
    file can undo, and a POSIX lock on FOLDER/.lock, which NFS also honours (its flock cannot
    lock a folder); either refuses a second run, and a filesystem with neither gets a warning."""
    failed = []
    for path, mode, take in ((folder, os.O_RDONLY, fcntl.flock),
                             (os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, fcntl.lockf)):
        fd = os.open(path, mode, 0o644)
        try:
            take(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _held.append(fd)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                unlock()
                raise FolderInUse(f"{folder} is in use by another train.py: wait for it to end, "
                                  f"or choose another --out") from None
            failed.append(e.strerror)
    if len(failed) == 2:
        print(f"train.py: warning: cannot lock {folder} ({failed[0]}: a filesystem without locks, "
              f"such as Lustre mounted without -o flock): nothing stops a second train.py from "
              f"writing this run folder at the same time", file=sys.stderr)


def unlock():
    while _held:
        os.close(_held.pop())


def new_folder(model):
    """A new runs/MODEL-DATE-TIME-XXXX: claimed by creating it, so two runs never share one."""
    try:
        os.makedirs("runs", exist_ok=True)
        out = tempfile.mkdtemp(prefix=f"{model}-{datetime.datetime.now():%Y%m%d-%H%M%S}-",
                               dir="runs")
        os.chmod(out, 0o755)  # mkdtemp's 0o700 would hide the run from the other users
        return out
    except OSError as e:
        raise RunError(f"cannot create a run folder in runs/ ({e.strerror})") from None


def provenance():
    """sha256 of train.py and vitc.py, and the git commit (with uncommitted changes or not) when
    they run from a git checkout: which code produced the run."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = {}
    for name in ("train.py", "vitc.py"):
        with open(os.path.join(here, name), "rb") as f:
            code[f"{name}_sha256"] = hashlib.sha256(f.read()).hexdigest()
    try:
        def git(*command):
            return subprocess.run(["git", "-C", here, *command], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        code["git_commit"] = git("rev-parse", "HEAD")
        code["git_changed"] = bool(git("status", "--porcelain", "--", "train.py", "vitc.py"))
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
        code["git_commit"] = None
    return code
