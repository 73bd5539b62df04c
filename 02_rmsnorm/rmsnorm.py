"""RMSNorm: root-mean-square layer normalization (Zhang & Sennrich, 2019, arXiv:1910.07467).

    y = x / sqrt(mean(x_i^2) + eps) * weight

Unlike LayerNorm it does not subtract the mean and has no bias: it only rescales each vector to unit
RMS, then applies a learned per-channel gain. Llama uses it before attention, before the FFN and
before the output head.

Layout: x is (..., dim); the statistic is taken over the last axis only.
Left out on purpose: a bias, mean-centring, and fused kernels (torch.nn.RMSNorm has one).

Demo: python 02_rmsnorm/rmsnorm.py
"""

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        assert dim > 0, f"RMSNorm dim must be positive, got {dim}"
        assert eps > 0, f"RMSNorm eps must be positive (it keeps 1/sqrt finite), got {eps}"
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # (dim,) the learned gain, 1 at init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Trap: in bfloat16 the mean of squares loses most of its mantissa (8 bits), so compute the
        # statistic in float32 and cast back with type_as, as Meta's reference does.
        x32 = x.float()
        rms_inv = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., 1)
        return (x32 * rms_inv).type_as(x) * self.weight.type_as(x)


if __name__ == "__main__":
    torch.manual_seed(0)
    x = torch.randn(4, 8, 512) * 7.0 + 3.0
    y = RMSNorm(512)(x)
    rms = y.pow(2).mean(-1).sqrt()
    print(f"input RMS per row  ~ {x.pow(2).mean(-1).sqrt().mean():.3f}")
    print(f"output RMS per row ~ {rms.mean():.6f} (max |rms - 1| = {(rms - 1).abs().max():.2e})")
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
    print("checked: with unit weight every output row has RMS 1")
