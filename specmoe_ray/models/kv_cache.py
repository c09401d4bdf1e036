"""Preallocated KV caches with per-sequence lengths and rollback.

`KVCache` layout per layer: keys and values together, `[num_slots + 1, 2, num_kv_heads, max_len, head_dim]`.
`MLACache` (DeepSeek's Multi-head Latent Attention) holds per token only the normalised latent
`c_kv [kv_lora_rank]` and the shared rope key `k_pe [qk_rope_head_dim]`, `[num_slots + 1,
max_len, dim]` per layer: keys and values are up-projected from them when read.

Each running sequence owns one slot. The extra last slot is a scratch row that padded
positions write into, so writes need no masking and no host sync.

Rollback is a length change: attention reads only positions `<= query position`, and a
sequence always rewrites position `p` before any query at `p` reads it, so entries past
a rolled-back length are dead and are overwritten on the way forward.
"""

from __future__ import annotations

import torch


class SlotCache:
    """Slot bookkeeping shared by the caches: allocate, free, advance, rollback, lengths."""

    def __init__(self, num_slots: int, max_len: int):
        self.num_slots = num_slots
        self.max_len = max_len
        self.scratch_slot = num_slots
        self.lengths = [0] * num_slots  # host-side: tokens cached per slot
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV cache has no free slot")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._free.append(slot)

    def advance(self, slot: int, num_tokens: int) -> None:
        """Record that `num_tokens` more positions of this slot were written."""
        if self.lengths[slot] + num_tokens > self.max_len:
            raise ValueError(
                f"slot {slot} would hold {self.lengths[slot] + num_tokens} > {self.max_len} tokens"
            )
        self.lengths[slot] += num_tokens

    def rollback(self, slot: int, length: int) -> None:
        """Forget every cached position `>= length` of this slot."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"rollback to {length} but slot {slot} holds {self.lengths[slot]} tokens")
        self.lengths[slot] = length


class KVCache(SlotCache):
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        super().__init__(num_slots, max_len)
        # Keys and values of a layer in one tensor: one write and one read per layer, not two.
        shape = (num_slots + 1, 2, num_kv_heads, max_len, head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def write(
        self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ):
        # slots, positions: [N]; k, v: [N, num_kv_heads, head_dim]
        self.write_kv(layer, slots, positions, torch.stack((k, v), dim=1))

    def write_kv(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor):
        # kv: [N, 2, num_kv_heads, head_dim], keys then values
        self.kv[layer][slots, :, :, positions] = kv

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # -> keys, values [B, num_kv_heads, length, head_dim] each
        kv = self.kv[layer][slots, :, :, :length]
        return kv[:, 0], kv[:, 1]


class MLACache(SlotCache):
    """The compressed cache of Multi-head Latent Attention: latent + rope key per token."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        super().__init__(num_slots, max_len)
        self.c_kv = [
            torch.zeros(num_slots + 1, max_len, kv_lora_rank, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.k_pe = [
            torch.zeros(num_slots + 1, max_len, rope_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]

    def write(
        self, layer: int, slots: torch.Tensor, positions: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor
    ):
        # slots, positions: [N]; c_kv: [N, kv_lora_rank]; k_pe: [N, rope_dim]
        self.c_kv[layer][slots, positions] = c_kv
        self.k_pe[layer][slots, positions] = k_pe

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        # -> c_kv [B, length, kv_lora_rank], k_pe [B, length, rope_dim]
        return self.c_kv[layer][slots, :length], self.k_pe[layer][slots, :length]
