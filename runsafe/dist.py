"""One process per GPU (NCCL) or CPU rank (gloo) under torchrun, and ranks that agree: an error
that one rank meets stops every rank with the same line, instead of leaving the others blocked
in a collective until the timeout."""

import contextlib
import datetime
import hashlib
import os
import socket

import torch
import torch.distributed as dist

from .errors import RunError


@contextlib.contextmanager
def distributed(timeout_minutes):
    """(rank, world_size, device) for the run inside; the process group is torn down after."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        check_gpu(device)
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    try:
        yield dist.get_rank() if dist.is_initialized() else 0, world_size(), device
        if dist.is_initialized():  # a clean end: without it, gloo's teardown can hang on torch 2.4
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_gpu(device):
    """Refuses a GPU that this torch build has no kernels for (V100, sm_70, in the default CUDA 13
    wheels): otherwise its first kernel fails with "no kernel image is available"."""
    major, minor = torch.cuda.get_device_capability(device)
    built = torch.cuda.get_arch_list()  # e.g. sm_75 ... sm_120, compute_120 (PTX, runs on newer)
    ptx = [int(a[8:]) for a in built if a.startswith("compute_")]
    if f"sm_{major}{minor}" not in built and not any(p <= major * 10 + minor for p in ptx):
        raise RunError(f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}) has no kernels in "
                       f"torch {torch.__version__} (built for {' '.join(built)}): install a torch "
                       f"build that has them (for V100: the CUDA 12.6 wheels, see the README)")


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def all_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag, device):
    """True on every rank if `flag` is true on any rank."""
    return bool(all_sum(torch.tensor([float(flag)], device=device)).item())


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
    gathered = [obj] * world_size()
    if dist.is_initialized():
        dist.all_gather_object(gathered, obj)
    return gathered


def agree(error):
    """Raises on every rank the RunError that any rank had (`error`: this rank's, or None)."""
    for rank, e in enumerate(all_gather(error)):
        if e is not None:
            raise type(e)(str(e) if rank == 0 else f"[rank {rank}] {e}")


@contextlib.contextmanager
def agreed():
    """A block that every rank runs: a RunError in it, on any rank, is raised on all of them."""
    error = None
    try:
        yield
    except RunError as e:
        error = e
    agree(error)


def on_rank_0(write):
    """Runs write() on rank 0 only; a RunError there (e.g. a full disk) stops every rank."""
    with agreed():
        if not dist.is_initialized() or dist.get_rank() == 0:
            write()


def sync_buffers(module):
    """BatchNorm statistics drift apart across ranks; evaluate and save rank 0's everywhere."""
    if dist.is_initialized():
        for b in module.buffers():
            dist.broadcast(b, 0)


def check_same_data(*datasets):
    """Every rank must see the same images: each node reads its own copy of the data, and a
    copy with files missing would shift the shards (images seen twice, others never) or, with
    a different number of steps, leave the ranks waiting on each other."""
    digest = hashlib.sha256()
    for d in datasets:
        root = getattr(d, "root", "")
        files = [os.path.relpath(path, root) for path, _ in getattr(d, "samples", [])]
        digest.update(repr((len(d), getattr(d, "classes", None), files)).encode())
    seen = all_gather((digest.hexdigest(), [len(d) for d in datasets], socket.gethostname()))
    for rank, (other, sizes, host) in enumerate(seen):
        if other != seen[0][0]:
            raise RunError(f"rank {rank} (on {host}) sees other data than rank 0 (on "
                           f"{seen[0][2]}): train/val images {sizes[0]}/{sizes[1]} against "
                           f"{seen[0][1][0]}/{seen[0][1][1]}, or other files or classes; every "
                           f"node needs the same copy of the data")
