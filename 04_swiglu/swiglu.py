"""SwiGLU feed-forward network (Shazeer, 2020, "GLU Variants Improve Transformer", arXiv:2002.05202).

    FFN(x) = w2( silu(w1 x) * w3 x ),   silu(z) = z * sigmoid(z)

w1 is the gate, w3 the up projection, w2 the down projection; no biases (as in Llama). A gated FFN
has three matrices instead of two, so Llama shrinks the hidden size to 2/3 of the usual 4·dim to keep
the parameter count, then rounds it up to a multiple of `multiple_of` for fast matmuls:

    hidden = multiple_of * ceil( int(2 * 4 * dim / 3) / multiple_of )     # 512 -> 1408

Layout: x is (..., dim). Left out on purpose: Llama 3's `ffn_dim_multiplier`, dropout (the block
in lesson 06 applies residual dropout).

Demo: python 04_swiglu/swiglu.py
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def ffn_hidden_dim(dim: int, multiple_of: int = 128) -> int:
    """Llama's hidden size: 2/3 of 4*dim, rounded up to a multiple of `multiple_of`."""
    assert dim > 0 and multiple_of > 0, f"dim and multiple_of must be positive, got {dim}, {multiple_of}"
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        assert dim > 0 and hidden_dim > 0, f"dim and hidden_dim must be positive, got {dim}, {hidden_dim}"
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (..., hidden) -> (..., dim)


if __name__ == "__main__":
    torch.manual_seed(0)
    hidden = ffn_hidden_dim(512, multiple_of=128)
    ffn = SwiGLU(512, hidden)
    n_params = sum(p.numel() for p in ffn.parameters())
    print(f"ffn_hidden_dim(512, multiple_of=128) = {hidden}; 3 * 512 * {hidden} = {n_params:,} parameters")
    x = torch.randn(2, 8, 512)
    gate = x @ ffn.w1.weight.T
    by_hand = (gate * torch.sigmoid(gate) * (x @ ffn.w3.weight.T)) @ ffn.w2.weight.T
    diff = (ffn(x) - by_hand).abs().max()
    print(f"max |SwiGLU(x) - formula| = {diff:.2e}")
    assert hidden == 1408 and diff < 1e-5
    print("checked: the module computes w2(silu(w1 x) * w3 x) and the seed's hidden size is 1408")
