"""Byte-level text data for replicate.py: the English fortunes of Debian's
`fortunes` package (about 2.6 MB written by people, none of it by this
project).

Every plain-text file of the directory (not the `.dat` indexes nor the `.u8`
links) is read in sorted name order. Each file is a list of fortunes separated
by lines holding only `%`; fortune number i (counted over all files in that
order) goes to the validation set when i % 10 == 9, to the training set
otherwise. A split is the bytes of its fortunes, each followed by "\\n%\\n".
Tokens are bytes (vocabulary 256).
"""

import os

import torch

FORTUNES_DIR = "/usr/share/games/fortunes"
VOCAB = 256
VAL_EVERY = 10


def fortune_files(directory=FORTUNES_DIR):
    """Sorted paths of the plain-text fortune files ([] if none)."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory)
                   if not n.endswith((".dat", ".u8")) and not n.startswith("."))
    return [os.path.join(directory, n) for n in names
            if os.path.isfile(os.path.join(directory, n))]


def load_splits(directory=FORTUNES_DIR):
    """(train, val) as uint8 torch tensors of bytes; raises FileNotFoundError
    when the fortunes are not installed."""
    files = fortune_files(directory)
    if not files:
        raise FileNotFoundError(
            f"no fortune files in {directory}: install Debian's 'fortunes' package "
            "(./scripts/install-deps.sh does)")
    train, val = bytearray(), bytearray()
    index = 0
    for path in files:
        with open(path, "rb") as f:
            text = f.read()
        for fortune in text.split(b"\n%\n"):
            fortune = fortune.strip(b"\n")
            if not fortune or fortune == b"%":
                continue
            (val if index % VAL_EVERY == VAL_EVERY - 1 else train).extend(fortune + b"\n%\n")
            index += 1
    return (torch.frombuffer(train, dtype=torch.uint8).clone(),
            torch.frombuffer(val, dtype=torch.uint8).clone())


class Batches:
    """Training batches: random windows of context + 1 bytes drawn by a
    generator seeded with `seed`, so every model trained with the same seed
    sees the same tokens in the same order."""

    def __init__(self, data, batch_size, context, seed):
        self.data, self.batch_size, self.context = data.long(), batch_size, context
        self.generator = torch.Generator().manual_seed(seed)

    def next(self):
        starts = torch.randint(0, len(self.data) - self.context - 1, (self.batch_size,),
                               generator=self.generator)
        rows = torch.stack([self.data[s:s + self.context + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]


def eval_windows(data, context, n_windows):
    """A fixed validation set: n_windows non-overlapping windows spread
    evenly over the split (the same for every run)."""
    data = data.long()
    span = context + 1
    available = len(data) // span
    n = min(n_windows, available)
    step = available // n
    rows = torch.stack([data[i * step * span:i * step * span + span] for i in range(n)])
    return rows[:, :-1], rows[:, 1:]
