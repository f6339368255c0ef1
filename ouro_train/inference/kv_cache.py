"""The decoding cache of a looped model: keys and values per (recurrent step, layer), and what a
token that exited early leaves behind for the steps it skipped.

Each recurrent step t attends to the keys/values of the *same* step t of earlier tokens (the
reference keeps R x L slots, index t * L + layer). With an early exit a token computes steps
1..n only; the policies say what later tokens find at steps n+1..R:

    full   R x L slots. A token that exits at n writes its step-n keys/values into the slots of
           steps n+1..R (the reference's layout; exact when nothing exits early).
    last   L slots shared by every step: a token leaves the keys/values of the last step it
           computed. Memory / R. (Paper, Table 14: within 0.1 / 2 points of `full` on GSM8K /
           MATH500.)
    avg    L slots: the mean of the keys/values of the steps the token computed.
    first  L slots: the first step's (the paper's worst: 18.7 / 8.4).

Layout: every slot is a (B, K, capacity, D) tensor for keys and one for values; all rows share the
position axis (prompts are left-padded, so row b's token i sits at the same column in every
row); `key_mask` (B, capacity) says which columns hold a real token of that row. The column of
the token being decoded is scratch while its steps run: step t writes its keys/values there and
attends to them; `finish_token` then leaves there what the policy says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KV_POLICIES = ("full", "last", "avg", "first")


class LoopKVCache:
    def __init__(
        self,
        policy: str,
        steps: int,
        layers: int,
        batch: int,
        capacity: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if policy not in KV_POLICIES:
            raise ValueError(f"kv cache policy {policy!r}: choose one of {', '.join(KV_POLICIES)}")
        self.policy, self.steps, self.layers = policy, steps, layers
        self.batch, self.capacity = batch, capacity
        slots = steps * layers if policy == "full" else layers
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(slots)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(slots)]
        self.key_mask = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0  # columns filled (the next token's column)
        # Per layer, for the token being decoded: its step-1 keys/values (first) or their running
        # fp32 sum over the steps it computed (avg). (B, K, 1, D) each.
        self._pending: list[list[torch.Tensor] | None] = [None] * layers
        self._computed = torch.zeros(batch, dtype=torch.int64, device=device)

    # -- accounting ---------------------------------------------------------------------------------
    @property
    def num_tensors(self) -> int:
        """Key and value tensors held: 2 R L (full) or 2 L (the shared policies)."""
        return len(self.keys) + len(self.values)

    def nbytes(self, used_only: bool = True) -> int:
        """Bytes of keys and values: of the filled columns (default) or of the whole allocation."""
        per = sum(t.element_size() * t.numel() for t in self.keys + self.values)
        return per * self.length // self.capacity if used_only else per

    def slot_index(self, step: int, layer: int) -> int:
        return step * self.layers + layer if self.policy == "full" else layer

    # -- prefill ------------------------------------------------------------------------------------
    def prefill_slots(self, step: int, attention_mask: torch.Tensor) -> list[PrefillSlot]:
        """Slots for a prompt (B, S) computed at every step: attention among the prompt's own
        tokens of this step (causal, padding masked), keys/values stored per the policy."""
        return [PrefillSlot(self, step, layer, attention_mask) for layer in range(self.layers)]

    def finish_prefill(self, attention_mask: torch.Tensor) -> None:
        """After all R steps of the prompt: columns 0..S-1 hold the policy's keys/values."""
        seq = attention_mask.shape[1]
        if self.policy == "avg":
            for layer in range(self.layers):
                k_sum, v_sum = self._pending[layer]
                self.keys[layer][:, :, :seq] = (k_sum / self.steps).to(self.keys[layer].dtype)
                self.values[layer][:, :, :seq] = (v_sum / self.steps).to(self.values[layer].dtype)
        self._pending = [None] * self.layers
        self.key_mask[:, :seq] = attention_mask.bool()
        self.length = seq

    # -- decoding -----------------------------------------------------------------------------------
    def begin_token(self, rows: torch.Tensor) -> None:
        """A new column for one token of each row in `rows` (the others are finished)."""
        if self.length >= self.capacity:
            raise RuntimeError(f"kv cache full: capacity {self.capacity} columns")
        self.key_mask[rows, self.length] = True
        self._computed.zero_()
        self._pending = [None] * self.layers

    def decode_slots(self, step: int, rows: torch.Tensor) -> list[DecodeSlot]:
        """Slots of step `step` for the rows still computing (indices into the batch)."""
        whole = rows.numel() == self.batch
        return [DecodeSlot(self, step, layer, rows, whole) for layer in range(self.layers)]

    def finish_token(self, exit_step: torch.Tensor, rows: torch.Tensor) -> None:
        """exit_step (B,): the last step (0-based) each row computed for this token; `rows`: the
        rows that decoded it. Leaves the policy's keys/values in the token's column."""
        col = self.length
        if self.policy == "full":
            exits = exit_step[rows]
            for step in range(1, self.steps):
                for source in exits[exits < step].unique().tolist():
                    skipped = rows[exits == source]  # rows that stopped at `source` < step
                    for layer in range(self.layers):
                        dst, src = self.slot_index(step, layer), self.slot_index(source, layer)
                        for store in (self.keys, self.values):
                            store[dst][skipped, :, col] = store[src][skipped, :, col]
        elif self.policy in ("first", "avg"):
            for layer in range(self.layers):
                k_acc, v_acc = self._pending[layer]
                if self.policy == "avg":
                    count = self._computed[rows].to(k_acc.dtype).view(-1, 1, 1)
                    k_acc, v_acc = k_acc[rows] / count, v_acc[rows] / count
                else:
                    k_acc, v_acc = k_acc[rows], v_acc[rows]
                self.keys[layer][rows, :, col] = k_acc[:, :, 0].to(self.keys[layer].dtype)
                self.values[layer][rows, :, col] = v_acc[:, :, 0].to(self.values[layer].dtype)
        # `last`: the column already holds the last computed step's keys/values.
        self._pending = [None] * self.layers
        self.length += 1

    def _remember(self, layer: int, step: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """first / avg: keep what finish_token will store for the token being decoded."""
        if self.policy not in ("first", "avg"):
            return
        if self._pending[layer] is None:
            shape = (self.batch, *k.shape[1:])
            self._pending[layer] = [torch.zeros(shape, dtype=torch.float32, device=k.device) for _ in range(2)]
        k_acc, v_acc = self._pending[layer]
        if self.policy == "avg":
            k_acc[rows] += k.float()
            v_acc[rows] += v.float()
            if layer == 0:
                self._computed[rows] += 1
        elif step == 0:
            k_acc[rows] = k.float()
            v_acc[rows] = v.float()


class PrefillSlot:
    def __init__(self, cache: LoopKVCache, step: int, layer: int, attention_mask: torch.Tensor) -> None:
        self.cache, self.step, self.layer, self.attention_mask = cache, step, layer, attention_mask

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache, seq = self.cache, q.shape[2]
        store = cache.policy == "full" or cache.policy == "last" or (cache.policy == "first" and self.step == 0)
        if store:  # `last` overwrites step by step and ends with step R's
            index = cache.slot_index(self.step, self.layer)
            cache.keys[index][:, :, :seq] = k
            cache.values[index][:, :, :seq] = v
        elif cache.policy == "avg":
            if self.step == 0:
                cache._pending[self.layer] = [k.float(), v.float()]
            else:
                cache._pending[self.layer][0] += k.float()
                cache._pending[self.layer][1] += v.float()
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=prefill_mask(self.attention_mask)[:, None], enable_gqa=k.shape[1] != q.shape[1]
        )


class DecodeSlot:
    def __init__(self, cache: LoopKVCache, step: int, layer: int, rows: torch.Tensor, whole: bool) -> None:
        self.cache, self.step, self.layer, self.rows, self.whole = cache, step, layer, rows, whole

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache, rows, col = self.cache, self.rows, self.cache.length
        index = cache.slot_index(self.step, self.layer)
        keys, values = cache.keys[index], cache.values[index]
        keys[rows, :, col] = k[:, :, 0]
        values[rows, :, col] = v[:, :, 0]
        cache._remember(self.layer, self.step, rows, k, v)
        end = col + 1
        if self.whole:  # every row computes: views, no copy
            keys, values, mask = keys[:, :, :end], values[:, :, :end], cache.key_mask[:, :end]
        else:
            keys, values, mask = keys[rows, :, :end], values[rows, :, :end], cache.key_mask[rows, :end]
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask[:, None, None, :], enable_gqa=k.shape[1] != q.shape[1]
        )


def prefill_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 1 = token, 0 = left padding -> (B, S, S) boolean: causal over real tokens. A padding
    query sees itself only (its output is never used; an all-False row would make NaNs)."""
    seq = attention_mask.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).tril()
    mask = causal[None] & attention_mask.bool()[:, None, :]
    return mask | torch.eye(seq, dtype=torch.bool, device=attention_mask.device)[None]
