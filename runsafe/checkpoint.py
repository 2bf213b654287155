"""Checkpoints for an exact resume: CPU copies of every state (a plain torch.load works on a
machine without a GPU), every rank's RNG state, the epochs' log, and a checksum of it all that
is verified on load (a damaged file is refused, not resumed)."""

import hashlib
import os
import random

import torch

from .errors import RunError
from .folder import save_atomic

# Each key of a checkpoint, with its type: a file without them is not one of this train.py's.
KEYS = {"model": dict, "ema": (dict, type(None)), "optimizer": dict, "scheduler": dict,
        "scaler": (dict, type(None)), "epoch": int, "step": int, "steps_per_epoch": int,
        "best": list, "args": dict, "progress": dict, "history": list,
        "classes": (list, type(None)), "rng": list}
# What a resumed run must share with the run that wrote the checkpoint: the model and everything
# the optimizer state and the schedule's position depend on. Data, workers, accumulation,
# augmentation, evaluation, precision and compilation may change.
RESUME_KEYS = ("model", "img_size", "num_classes", "optimizer", "batch_size", "epochs",
               "warmup_epochs", "lr", "wd")


def to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def digest(obj, h=None):
    """sha256 of the contents: every tensor's dtype, shape and bytes, every other value's repr."""
    h = hashlib.sha256() if h is None else h
    if isinstance(obj, torch.Tensor):
        h.update(f"{obj.dtype}{tuple(obj.shape)}".encode())
        h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        for key, value in obj.items():
            h.update(repr(key).encode())
            digest(value, h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for value in obj:
            digest(value, h)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())
    return h


def save(obj, path):
    """Writes `obj` (a dict) to PATH atomically, as CPU tensors, with its checksum."""
    obj = to_cpu({k: v for k, v in obj.items() if k != "sha256"})
    obj["sha256"] = digest(obj).hexdigest()
    save_atomic(path, lambda f: torch.save(obj, f))


def load(path, keys=()):
    """The dict saved at PATH, its checksum verified and `keys` present with their types."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path}: no such file") from None
    except Exception as e:
        raise RunError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0][:200]})") from None
    verify(path, obj)
    for key in keys:
        if not isinstance(obj.get(key), KEYS[key]):
            raise RunError(f"{path}: not a train.py checkpoint ({key!r} missing or of the wrong "
                           f"type; best.pt holds weights only)")
    return obj


def verify(path, obj):
    """Refuses a file whose contents do not match the checksum saved with them."""
    if not isinstance(obj, dict) or "sha256" not in obj:
        raise RunError(f"{path}: not a checkpoint of this train.py (no checksum)")
    if digest({k: v for k, v in obj.items() if k != "sha256"}).hexdigest() != obj["sha256"]:
        raise RunError(f"{path}: damaged (its contents do not match its checksum){good_state(path)}")


def good_state(path):
    """What else the folder holds, for a damaged file's message."""
    best = os.path.join(os.path.dirname(path), "best.pt")
    try:
        epoch = load(best)["epoch"] if best != path and os.path.exists(best) else None
    except RunError:
        return f"; {best} is damaged too"
    return "; no other copy of the run is kept" if epoch is None else \
        f"; {best} (epoch {epoch}) is intact and holds the best weights"


def load_resumable(path, args):
    """A checkpoint that `args` can resume: complete, intact and of the same model and recipe."""
    ckpt = load(path, keys=KEYS)
    if not ckpt["rng"]:
        raise RunError(f"{path}: not a train.py checkpoint (no RNG state in 'rng')")
    for key in RESUME_KEYS:
        if ckpt["args"].get(key) != getattr(args, key):
            raise RunError(f"--resume {path}: checkpoint has {key}={ckpt['args'].get(key)}, this "
                           f"run has {key}={getattr(args, key)}; a resumed run keeps its settings")
    return ckpt


def rng_state(device):
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
