"""SavedTensorCount: how many tensors autograd saved for backward are still alive, i.e. the saved
activations of every graph that something still holds (tests that a dropped forward frees its graph)."""
from __future__ import annotations

import weakref

import torch


class _Holder:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach()  # a saved output would otherwise hold its own graph: a cycle through C++


class SavedTensorCount:
    """`with count.hooks(): ...` wraps each tensor saved inside in a holder whose lifetime is tracked;
    `len(count.alive)` is how many of them are still referenced by some graph."""

    def __init__(self):
        self.alive: weakref.WeakSet = weakref.WeakSet()

    def hooks(self):
        def pack(tensor):
            holder = _Holder(tensor)
            self.alive.add(holder)
            return holder
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor)
