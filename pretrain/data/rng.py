"""Every random draw in the data pipeline comes from a seed derived from its position, so a stream is a pure function
of (seed, epoch, rank, stream, sample index) and a resumed loader replays it exactly, whatever ran before."""
import contextlib
import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers; stable across processes and Python runs (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def seeded_global_rngs(seed: int, with_numpy: bool):
    """Seed the global RNGs torchvision (torch) and timm (random, numpy) draw from, restoring them afterwards so the
    training process's own streams are untouched when the pipeline runs in the main process (workers=0).
    numpy's state is costly to save (~0.1 ms), so only RandAugment, which uses it, pays for it."""
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    numpy_state = np.random.get_state() if with_numpy else None
    torch.default_generator.manual_seed(seed)  # torch.manual_seed also seeds every accelerator: ~100x slower
    random.seed(seed)
    if with_numpy:
        np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        if with_numpy:
            np.random.set_state(numpy_state)
