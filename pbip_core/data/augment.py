"""The augmentation of both training stages: random flips and rot90 (the official code's; the paper names none).

An image (and, in stage 2, its mask) gets one of the 8 symmetries of the square, drawn from a generator that depends
only on ``(seed, epoch, index)`` (:func:`item_generator`), so the draws do not depend on data-loader workers and a
resumed run repeats them.
"""

from __future__ import annotations

import torch


def dihedral(x: torch.Tensor, k: int, hflip: bool, vflip: bool) -> torch.Tensor:
    """One of the 8 flips/rotations of the square on the last two axes: flips first, then ``rot90`` k times."""
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    return torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x


def random_dihedral(generator: torch.Generator) -> tuple[int, bool, bool]:
    """Draw ``(k, hflip, vflip)``: random horizontal/vertical flips (p = 0.5 each) and a random rot90."""
    r = torch.randint(0, 2, (2,), generator=generator)
    k = int(torch.randint(0, 4, (1,), generator=generator))
    return k, bool(r[0]), bool(r[1])


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch, index): augmentations do not depend on worker order."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + index)
    return g
