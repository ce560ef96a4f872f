"""Models kept loaded for inference, shared by every visitor: a small thread-safe LRU cache.

Loading GPT-2 medium takes seconds and ~0.7 GB in bf16, so the playground and
the evaluation keep the last few models they used instead of loading per request.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

from .gpt import GPT
from .inference import held_bytes


class ModelRegistry:
    def __init__(self, capacity: int = 3):
        self.capacity = capacity
        self._models: OrderedDict[str, GPT] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, key: str, load: Callable[[], GPT]) -> GPT:
        """The model cached under ``key``, loading it with ``load()`` once even when several ask at once."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            model = load().eval()
            for p in model.parameters():
                p.requires_grad_(False)
            with self._lock:
                self._models[key] = model
                self._models.move_to_end(key)
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
                self._loading.pop(key, None)
            return model

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def nbytes(self) -> int:
        """Bytes the cached models hold (``held_bytes``)."""
        with self._lock:
            models = list(self._models.values())
        return sum(held_bytes(m) for m in models)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()

