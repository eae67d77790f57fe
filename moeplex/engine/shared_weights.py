"""Backbone tensors that are identical across variants, kept once so that mixed batches run them as one matmul."""

from __future__ import annotations

import dataclasses
import threading
import weakref

import torch

from moeplex.model.weights import Backbone


class IdenticalTensorPool:
    """Replaces each backbone tensor by an equal one already resident at the same place (e.g. `layers.3.router`).

    Fine-tunes often leave embeddings, lm_head or whole layers untouched; those tensors are then held
    once, and the mixed-variant runner, which groups work by tensor identity, runs them for all such
    variants together. The pool holds weak references only: evicted backbones are not kept alive.
    """

    def __init__(self):
        self._resident: dict[str, list[weakref.ref]] = {}
        self._lock = threading.Lock()  # backbones load in the step loop and in the prefetch worker

    def share(self, backbone: Backbone) -> Backbone:
        with self._lock:
            self._share_fields(backbone, "")
        return backbone

    def _share_fields(self, obj, path: str) -> None:
        for field in dataclasses.fields(obj):
            value, name = getattr(obj, field.name), f"{path}{field.name}"
            if isinstance(value, torch.Tensor):
                setattr(obj, field.name, self._canonical(name, value))
            elif dataclasses.is_dataclass(value):
                self._share_fields(value, f"{name}.")
            elif isinstance(value, list):
                for index, item in enumerate(value):
                    self._share_fields(item, f"{name}.{index}.")

    def _canonical(self, path: str, tensor: torch.Tensor) -> torch.Tensor:
        alive = [known for ref in self._resident.get(path, []) if (known := ref()) is not None]
        for known in alive:
            if known is tensor or (known.shape == tensor.shape and known.dtype == tensor.dtype and torch.equal(known, tensor)):
                return known
        self._resident[path] = [weakref.ref(t) for t in (*alive, tensor)]
        return tensor
