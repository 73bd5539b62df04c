"""RoPE: rotary position embedding (Su et al., 2021, "RoFormer", arXiv:2104.09864).

Split each head vector x (head_dim = D) into D/2 pairs and rotate pair i at position m by the angle
m * theta_i, with theta_i = theta ** (-2i / D) and theta = 10000:

    [x'_2i  ]   [cos m·theta_i  -sin m·theta_i] [x_2i  ]
    [x'_2i+1] = [sin m·theta_i   cos m·theta_i] [x_2i+1]

A rotation keeps the norm, and <rope(q, m), rope(k, n)> depends only on m - n: attention scores see
relative positions although each vector is rotated by its absolute one.

Pairs: this file rotates INTERLEAVED pairs (x0, x1), (x2, x3), ... like Meta's Llama reference.
Hugging Face's Llama rotates SPLIT HALVES (x_i, x_{i+D/2}). Both are the same math on a permuted
head dimension; exporting to Hugging Face permutes the rows of wq and wk (see notes.md).

Layout: x is (B, T, n_heads, head_dim). The table is (max_seq_len, head_dim // 2, 2): [cos, sin].
Left out on purpose: RoPE scaling for long context (Llama 3.1's frequency bands, NTK, YaRN).

Demo: python 03_rope/rope.py
"""

import torch


def precompute_rope(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> torch.Tensor:
    """The rotation table for positions 0 .. max_seq_len-1: (max_seq_len, head_dim // 2, 2)."""
    assert head_dim > 0 and head_dim % 2 == 0, f"RoPE rotates pairs: head_dim must be even, got {head_dim}"
    assert max_seq_len > 0, f"max_seq_len must be positive, got {max_seq_len}"
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    # float64 for the angles: m * theta_i at m ~ 1e5 loses digits in float32 before cos/sin.
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T, D/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()  # (T, D/2, 2)


def apply_rope(x: torch.Tensor, table: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
    """Rotate x (B, T, n_heads, head_dim) as positions start_pos .. start_pos+T-1. start_pos is one int for the
    whole batch, or a (B,) tensor when each row is at a position of its own (lesson 12's continuous batching)."""
    B, T, H, D = x.shape
    assert table.shape[1] * 2 == D, f"table is for head_dim {table.shape[1] * 2}, x has {D}"
    if isinstance(start_pos, int):
        assert start_pos + T <= table.shape[0], (
            f"positions up to {start_pos + T - 1} need a table of at least {start_pos + T} rows, "
            f"it has {table.shape[0]} (raise max_seq_len)"
        )
        cos, sin = table[start_pos : start_pos + T][None].unbind(-1)  # each (1, T, D/2)
    else:  # row b at positions start_pos[b] + 0..T-1 (not checked here: reading the tensor would sync a GPU)
        cos, sin = table[start_pos[:, None] + torch.arange(T, device=start_pos.device)].unbind(-1)  # each (B, T, D/2)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (1 or B, T, 1, D/2) broadcast over heads
    # Rotate in float32 like the table; the result is cast back to x's dtype.
    x_even, x_odd = x.float().reshape(B, T, H, D // 2, 2).unbind(-1)  # each (B, T, H, D/2)
    rotated = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)  # (B, T, H, D/2, 2)
    return rotated.flatten(3).type_as(x)  # (B, T, H, D)


if __name__ == "__main__":
    torch.manual_seed(0)
    table = precompute_rope(head_dim=32, max_seq_len=512)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)
    x = torch.randn(2, 512, 16, 32)
    drift = (apply_rope(x, table).norm(dim=-1) - x.norm(dim=-1)).abs().max()
    print(f"max | |rope(x)| - |x| | over 512 positions: {drift:.2e}")

    def score(m: int, n: int) -> float:
        return (apply_rope(q, table, m) * apply_rope(k, table, n)).sum().item()

    print(f"<rope(q,5), rope(k,2)> = {score(5, 2):+.6f}   <rope(q,105), rope(k,102)> = {score(105, 102):+.6f}")
    assert drift < 1e-4 and abs(score(5, 2) - score(105, 102)) < 1e-4
    print("checked: rotation keeps the norm, and the score depends only on m - n")
