"""Byte accounting of the KV cache: each sequence's cache capacity, charged against one budget."""

from __future__ import annotations

from moeplex.model.spec import ModelSpec


def kv_bytes_per_token(spec: ModelSpec, element_size: int) -> int:
    """Bytes of keys and values of one token over all layers."""
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * element_size


def grown_capacity(capacity: int, total_tokens: int) -> int:
    """Capacity of a SequenceKVCache after reserve(total_tokens): at least double when it has to grow."""
    return capacity if total_tokens <= capacity else max(total_tokens, 2 * capacity)


class KVCacheBudget:
    """Tracks each live sequence's cache capacity in tokens; the sum times bytes_per_token stays within capacity_bytes.

    The capacities are exactly those of the SequenceKVCache objects the engine allocates (a new cache
    starts at initial_tokens or the first chunk's size, then grows as SequenceKVCache.reserve does).
    """

    def __init__(self, capacity_bytes: int, bytes_per_token: int, initial_tokens: int = 16):
        self.capacity_bytes, self.bytes_per_token, self.initial_tokens = capacity_bytes, bytes_per_token, initial_tokens
        self.capacity_tokens: dict[int, int] = {}

    @property
    def used_bytes(self) -> int:
        return sum(self.capacity_tokens.values()) * self.bytes_per_token

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def capacity_after(self, seq_id: int, total_tokens: int) -> int:
        current = self.capacity_tokens.get(seq_id)
        if current is None:
            return max(self.initial_tokens, total_tokens)
        return grown_capacity(current, total_tokens)

    def worst_case_bytes(self, max_tokens: int) -> int:
        """An upper bound on one sequence's bytes at max_tokens: its last growth may double a nearly full cache."""
        return max(self.initial_tokens, 2 * max_tokens) * self.bytes_per_token

    def try_reserve(self, seq_id: int, total_tokens: int) -> bool:
        """Charge the growth needed to hold total_tokens; False (and nothing charged) if it does not fit."""
        capacity = self.capacity_after(seq_id, total_tokens)
        extra = (capacity - self.capacity_tokens.get(seq_id, 0)) * self.bytes_per_token
        if extra > self.free_bytes:
            return False
        self.capacity_tokens[seq_id] = capacity
        return True

    def release(self, seq_id: int) -> None:
        self.capacity_tokens.pop(seq_id, None)
