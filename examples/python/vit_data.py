"""Fashion-MNIST for vit.py, from Debian's `dataset-fashion-mnist` package.

The package ships the four original gzip-compressed IDX files in
/usr/share/datasets/fashion-mnist: 60,000 training and 10,000 test images of
28 x 28 unsigned bytes, with labels 0..9. IDX is big-endian: two zero bytes,
a type byte (0x08 = unsigned byte), a rank byte, then one 32-bit size per
dimension, then the values in row-major order. The parser checks every field
against the file's length before reading values.
"""

import gzip
import os
import struct

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Normalisation constants: mean and standard deviation of the training
# pixels scaled to [0, 1] (computed once from the files; the test checks them).
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530


class IdxError(ValueError):
    """A file that is not a well-formed unsigned-byte IDX file."""


def parse_idx(raw, name="<bytes>"):
    """The unsigned-byte array stored in IDX bytes `raw` (uncompressed).
    Raises IdxError naming `name` and the field that is wrong."""
    if len(raw) < 4:
        raise IdxError(f"{name}: {len(raw)} bytes, shorter than the 4-byte IDX magic")
    zero, dtype, rank = struct.unpack(">HBB", raw[:4])
    if zero != 0:
        raise IdxError(f"{name}: IDX magic must start with two zero bytes, got {raw[:2].hex()}")
    if dtype != 0x08:
        raise IdxError(f"{name}: IDX type 0x{dtype:02x} is not 0x08 (unsigned byte)")
    if not 1 <= rank <= 3:
        raise IdxError(f"{name}: IDX rank {rank} (expected 1 to 3)")
    header = 4 + 4 * rank
    if len(raw) < header:
        raise IdxError(f"{name}: {len(raw)} bytes, shorter than its {header}-byte header")
    shape = struct.unpack(f">{rank}I", raw[4:header])
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != count:
        raise IdxError(f"{name}: shape {shape} needs {count} value bytes, the file has "
                       f"{len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path):
    """parse_idx of a file, gunzipped when its name ends in .gz."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip's BadGzipFile is an OSError
        raise IdxError(f"{path}: cannot read: {e}") from e
    return parse_idx(raw, path)


def available(directory=FASHION_MNIST_DIR):
    """True when all four files are present."""
    return all(os.path.isfile(os.path.join(directory, n))
               for pair in FILES.values() for n in pair)


def load_split(split, directory=FASHION_MNIST_DIR):
    """(images uint8 [N, 28, 28], labels uint8 [N]) of "train" or "test"."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not available(directory):
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {directory}: install Debian's 'dataset-fashion-mnist' "
            "package (./scripts/install-deps.sh does)")
    images_name, labels_name = FILES[split]
    images = read_idx(os.path.join(directory, images_name))
    labels = read_idx(os.path.join(directory, labels_name))
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise IdxError(f"{images_name}: shape {images.shape}, expected [N, 28, 28]")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise IdxError(f"{labels_name}: shape {labels.shape} does not match {images.shape[0]} images")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise IdxError(f"{labels_name}: label {int(labels.max())} outside 0..{len(CLASSES) - 1}")
    return images, labels


def to_tensors(images, labels):
    """float32 [N, 28, 28] normalised images and int64 [N] labels (torch)."""
    import torch

    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = (x - PIXEL_MEAN) / PIXEL_STD
    return x, torch.from_numpy(labels.astype(np.int64))
