"""An image file as the 8-bit RGB image the model reads, for every mode PIL opens it in."""

import warnings

import numpy as np
from PIL import Image

SCALED = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1}


def load_rgb(path):
    """`path` as an 8-bit RGB PIL image, or an exception naming the mode it cannot convert.

    16-bit grayscale (I;16*, and I as 16-bit PNGs once opened) is scaled by 255/65535 and float
    (F) by 255; other ranges (I outside 0-65535, F outside 0-1, NaN) are refused as of unknown
    scale. Other modes: PIL's convert("RGB") (palette, alpha dropped, CMYK, 1, L...). PIL's
    DecompressionBombWarning and DecompressionBombError come again naming the file."""
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_rgb(image)
    except Image.DecompressionBombError as e:
        raise Image.DecompressionBombError(f"{path}: {e}") from None
    finally:  # outside catch_warnings: the caller's filters decide
        for w in caught:
            if issubclass(w.category, Image.DecompressionBombWarning):
                warnings.warn(f"{path}: {w.message}", w.category, stacklevel=2)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def to_rgb(image):
    if image.mode in SCALED:
        values, top = np.asarray(image, dtype=np.float64), SCALED[image.mode]
        low, high = values.min(), values.max()
        if not 0 <= low <= high <= top:  # NaN fails too
            raise ValueError(f"mode {image.mode} with values {low:g} to {high:g}: only 0 to "
                             f"{top} has a known scale to 8 bits")
        return Image.fromarray(np.rint(values * (255 / top)).astype(np.uint8)).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"mode {image.mode}: cannot convert it to RGB ({e})") from None
