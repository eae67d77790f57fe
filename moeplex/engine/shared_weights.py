"""Backbone tensors that are identical across variants, kept once so that mixed batches run them as one matmul."""

from __future__ import annotations

import threading
import weakref

import torch

from moeplex.model.weights import Backbone, tensor_fields


class IdenticalTensorPool:
    """Replaces each backbone tensor by an equal one already resident at the same place (e.g. `layers.3.router`).

    Fine-tunes often leave embeddings, lm_head or whole layers untouched; those tensors are then held
    once; a step whose variants all hold the same tensor runs it as one plain matmul, and `VariantStacks`
    does not stack it. The pool holds weak references only: evicted backbones are not kept alive.
    """

    def __init__(self):
        self._resident: dict[str, list[weakref.ref]] = {}
        self._lock = threading.Lock()  # backbones load in the step loop and in the prefetch worker

    def share(self, backbone: Backbone) -> Backbone:
        with self._lock:
            for path, (owner,), field in tensor_fields([backbone]):
                setattr(owner, field, self._canonical(path, getattr(owner, field)))
        return backbone

    def _canonical(self, path: str, tensor: torch.Tensor) -> torch.Tensor:
        alive = [known for ref in self._resident.get(path, []) if (known := ref()) is not None]
        for known in alive:
            if known is tensor or (known.shape == tensor.shape and known.dtype == tensor.dtype and torch.equal(known, tensor)):
                return known
        self._resident[path] = [weakref.ref(t) for t in (*alive, tensor)]
        return tensor
