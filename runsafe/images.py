"""Image folders that survive bad files: an unreadable train image is named and replaced by the
next readable one, an unreadable val image is named and left out; both are counted (see
monitor.py for the limits)."""

import os
import sys

from PIL import Image
from torchvision import datasets
from tqdm import tqdm

from .decode import load_rgb
from .errors import RunError

MAX_UNREADABLE_IN_A_ROW = 64  # then a train item is a blank (label -1): the data must be gone


class ImageFiles(datasets.ImageFolder):
    """ImageFolder whose items are (image, label, unreadable): `unreadable` names the item's own
    file and why, if it could not be decoded ("" if it could). In the train set (`replace`) such
    a file is replaced by the next readable one; in the val set, and after
    MAX_UNREADABLE_IN_A_ROW unreadable files in a row, the item is a blank image, label -1."""

    def __init__(self, root, transform, replace, blank_size):
        super().__init__(root, transform, loader=load_rgb)
        self.replace, self.blank_size = replace, blank_size
        check_reached_once(self.samples)

    def __getitem__(self, index):
        own = ""  # this item's file, if unreadable, with the reason
        for i in range(index, index + (MAX_UNREADABLE_IN_A_ROW if self.replace else 1)):
            path, label = self.samples[i % len(self.samples)]
            try:
                image = self.loader(path)  # 8-bit RGB, from any mode PIL reads
            except Exception as e:  # truncated, empty, not an image, unreadable...
                own = own or f"{path} ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})"
                continue
            return self.transform(image), label, own
        return self.transform(Image.new("RGB", (self.blank_size,) * 2)), -1, own


def check_reached_once(samples):
    """ImageFolder follows symbolic links: a link loop repeats a folder's files (40 became 1,640)
    and a second link to a folder or file counts its images twice. Refused, naming the path."""
    first, folders = {}, {}
    for path, _ in samples:
        folder, name = os.path.split(path)
        real = os.path.realpath(path) if os.path.islink(path) else os.path.join(
            folders.setdefault(folder, os.path.realpath(folder)), name)  # a folder resolved once
        if first.setdefault(real, path) != path:
            raise RunError(f"{path} is {first[real]} again (a symbolic link loop, or a second link "
                           f"to a folder or an image): its images would count twice; remove the link")


class FakeImages(datasets.FakeData):
    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return image, label, ""


def warn_unreadable(bad, rank_prefix=""):
    """Names each unreadable file of a batch's `bad` strings; returns how many there were."""
    files = [entry for entry in bad if entry]
    for line in files:
        tqdm.write(f"train.py: warning: {rank_prefix}unreadable image {line}", file=sys.stderr)
    return len(files)
