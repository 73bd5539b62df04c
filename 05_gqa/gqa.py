"""Grouped-query attention with RoPE and a KV cache (Ainslie et al., 2023, arXiv:2305.13245).

    Attention(Q, K, V) = softmax( Q K^T / sqrt(d) + M ) V,   M[i, j] = -inf where key j is after query i

n_heads query heads share n_kv_heads key/value heads: query head h reads K/V head h // (n_heads /
n_kv_heads). n_kv_heads == n_heads is multi-head attention, n_kv_heads == 1 is multi-query
attention. Fewer K/V heads shrink the KV cache, which is what bounds decoding speed and memory.

Two paths compute the same thing: `attention_by_hand` (the formula, what this lesson teaches) and
`torch.nn.functional.scaled_dot_product_attention` (fused kernels: flash attention on GPU). The KV
cache stores the rotated keys and the values of past positions so that decoding one token costs one
row of attention instead of the whole square.

Layout: activations (B, T, dim); per-head tensors (B, T, n_heads, head_dim) while RoPE is applied,
then (B, n_heads, T, head_dim) for the attention itself.
Left out on purpose: paged caches, sliding windows, attention sinks.

Demo: python 05_gqa/gqa.py
"""

import math
import sys
from importlib import import_module
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
rope = import_module("03_rope.rope")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv_heads, T, hd) -> (B, n_kv_heads * n_rep, T, hd): K1,K1,K2,K2 (repeat_interleave).

    Trap: x.repeat(1, n_rep, 1, 1) gives K1,K2,K1,K2 and pairs query heads with the wrong K/V head.
    """
    return x if n_rep == 1 else torch.repeat_interleave(x, n_rep, dim=1)


def causal_mask(t_q: int, t_k: int, device=None) -> torch.Tensor:
    """(t_q, t_k) bool, True where query i may see key j. The queries are the LAST t_q positions.

    Trap: SDPA's is_causal=True aligns the mask top-left (query i sees keys 0..i), which is wrong
    as soon as a cache makes t_k > t_q; here query i sits at position t_k - t_q + i.
    """
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def attention_by_hand(q, k, v, mask: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for q (B, H, Tq, d), k and v (B, H, Tk, d), mask (Tq, Tk)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.dropout(F.softmax(scores.float(), dim=-1).type_as(q), p=dropout_p)  # softmax in fp32
    return weights @ v  # (B, H, Tq, d)


class KVCache:
    """Rotated keys and values of past positions for one layer: (max_batch, max_seq_len, n_kv_heads, hd)."""

    def __init__(self, max_batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype=None, device=None):
        self.k = torch.zeros(max_batch, max_seq_len, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, T, n_kv, hd) at start_pos; return all keys and values so far (B, start_pos+T, n_kv, hd)."""
        B, T = k.shape[:2]
        assert B <= self.k.shape[0], f"batch {B} is larger than the cache's {self.k.shape[0]}"
        assert start_pos + T <= self.k.shape[1], f"position {start_pos + T - 1} is past the cache's {self.k.shape[1]}"
        self.k[:B, start_pos : start_pos + T] = k
        self.v[:B, start_pos : start_pos + T] = v
        return self.k[:B, : start_pos + T], self.v[:B, : start_pos + T]


class GroupedQueryAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, dropout: float = 0.0):
        super().__init__()
        assert dim % n_heads == 0, f"dim ({dim}) must be divisible by n_heads ({n_heads})"
        assert n_kv_heads > 0 and n_heads % n_kv_heads == 0, (
            f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads}): each K/V head serves a whole group"
        )
        assert (dim // n_heads) % 2 == 0, f"head_dim = dim / n_heads = {dim // n_heads} must be even for RoPE"
        assert 0.0 <= dropout < 1.0, f"dropout must be in [0, 1), got {dropout}"
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.n_rep = n_heads // n_kv_heads  # query heads per K/V head
        self.dropout = dropout
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, rope_table, start_pos: int = 0, cache: KVCache | None = None, by_hand: bool = False):
        """x (B, T, dim) at positions start_pos.. -> (B, T, dim). With a cache, earlier positions come from it."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        q, k = rope.apply_rope(q, rope_table, start_pos), rope.apply_rope(k, rope_table, start_pos)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)  # (B, start_pos+T, Hkv, hd)
        else:
            assert start_pos == 0, "without a cache the sequence must start at position 0"
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H or Hkv, T, hd)
        t_k = k.shape[2]
        dropout_p = self.dropout if self.training else 0.0
        if by_hand:
            mask = causal_mask(T, t_k, x.device)
            y = attention_by_hand(q, repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep), mask, dropout_p)
        else:
            # is_causal only when queries and keys are the same positions (top-left == bottom-right);
            # one new token sees every key, so it needs no mask; a chunk after a cache needs the real one.
            # `T > 1` first: under torch.compile(dynamic=True) `T == t_k` is a symbolic bool that SDPA
            # rejects (a graph break per layer); a one-token step must short-circuit to a plain False.
            mask = None if T == t_k or T == 1 else causal_mask(T, t_k, x.device)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=(T > 1 and T == t_k),
                enable_gqa=self.n_rep > 1,  # SDPA shares K/V across groups without copying them
            )  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*hd) -> (B, T, dim)


if __name__ == "__main__":
    torch.manual_seed(0)
    attn = GroupedQueryAttention(dim=512, n_heads=16, n_kv_heads=8).eval()
    table = rope.precompute_rope(head_dim=32, max_seq_len=64)
    x = torch.randn(2, 40, 512)
    with torch.no_grad():
        full = attn(x, table)
        by_hand = attn(x, table, by_hand=True)
        cache = KVCache(2, 64, 8, 32)
        steps = [attn(x[:, :24], table, 0, cache)] + [attn(x[:, t : t + 1], table, t, cache) for t in range(24, 40)]
        decoded = torch.cat(steps, dim=1)
    print(f"16 query heads share 8 K/V heads; K/V cache holds {cache.k.numel() * 2:,} numbers (MHA: twice that)")
    print(f"max |by hand - SDPA|            = {(by_hand - full).abs().max():.2e}")
    print(f"max |prefill 24 + 16 decodes - full pass| = {(decoded - full).abs().max():.2e}")
    assert torch.allclose(by_hand, full, atol=1e-5) and torch.allclose(decoded, full, atol=1e-5)
    print("checked: hand-written attention == SDPA, and KV-cache decoding == one full pass")
