"""This process's random-number generator states (python, numpy, torch CPU and CUDA), captured and
restored together so a resumed run draws what the interrupted one would have drawn.

The captured state holds only tensors and plain Python values (numpy's key array as an int64 tensor),
so checkpoints store it without pickled classes and read it back with torch.load(weights_only=True)."""

from __future__ import annotations

import random

import numpy as np
import torch


def process_rng_state() -> dict:
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (str(algorithm), torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                       float(cached_gaussian)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_process_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    algorithm, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((algorithm, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
