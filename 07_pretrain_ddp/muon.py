"""Muon: momentum, then the update orthogonalized by a few Newton-Schulz steps (Jordan et al., 2024; Liu et al.,
2025, "Muon is Scalable for LLM Training", arXiv:2502.16982). For the 2-D weight matrices of the blocks only.

    M_t = mu M_{t-1} + (1 - mu) G_t            momentum: an average of the gradients G (mu = 0.95)
    U_t = (1 - mu) G_t + mu M_t                Nesterov: the gradient, a step further along the momentum
    O_t = NS_5(U_t) ~ P Q^T  where U_t = P S Q^T (its SVD): every singular value replaced by about 1
    W_t = (1 - lr wd) W_{t-1} - lr s O_t       s = 0.2 sqrt(max(rows, cols)): O_t's RMS becomes 0.2, AdamW's

    NS_5: X_0 = U / ||U||_F (so every singular value is <= 1), then five times
          X <- a X + (b A + c A^2) X,   A = X X^T,   (a, b, c) = (3.4445, -4.7750, 2.0315)
    which applies p(s) = a s + b s^3 + c s^5 to each singular value s, leaving P and Q alone: p has a steep
    slope at 0 (a = 3.44) to lift small singular values fast, so five steps, even in bfloat16, bring every singular
    value within a factor ~100 of the largest into about [0.7, 1.2] (not exactly 1: that would take more steps, and
    does not train better). The orthogonalized update moves every direction of the matrix by the same amount,
    where the raw gradient is dominated by a few: steepest descent under the spectral norm (notes.md).

Embeddings, the tied head and the norm gains stay on AdamW: a lookup table's rows and a vector have no
matrix structure for the orthogonalization to use. `Combined` steps both optimizers as one.
This file equals torch.optim.Muon (torch >= 2.9) step for step: the test checks it. Demo: python 07_pretrain_ddp/muon.py
"""

import math

import torch

COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: the largest slope at 0 that still converges


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype=None) -> torch.Tensor:
    """(rows, cols) -> the same shape, with every singular value pushed toward 1. dtype None: bfloat16 on a GPU, as in
    the paper (tensor cores), float32 on a CPU (without bf16 units, bf16 matmuls run ~25x slower there)."""
    a, b, c = COEFFICIENTS
    x = g.to(dtype or (torch.bfloat16 if g.is_cuda else torch.float32))
    wide = g.size(0) <= g.size(1)
    x = x if wide else x.T  # (short side, long side): A = X X^T is the small Gram matrix
    x = x / x.norm().clamp(min=eps)  # ||X||_2 <= ||X||_F = 1: inside p's range
    for _ in range(steps):
        A = x @ x.T  # (short, short)
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        x = torch.addmm(x, B, x, beta=a)  # a X + B X
    return x if wide else x.T


def lr_scale(shape, adjust: str = "match_rms_adamw") -> float:
    """The shape-based scale of the learning rate. An orthogonal (rows, cols) matrix has RMS 1 / sqrt(max(rows, cols)):
    0.2 sqrt(max) brings the update to AdamW's typical RMS of 0.2, so AdamW's learning rate carries over (Liu et al.);
    "original" is Jordan's sqrt(max(1, rows / cols)), with learning rates about 0.02."""
    rows, cols = shape[:2]
    return 0.2 * math.sqrt(max(rows, cols)) if adjust == "match_rms_adamw" else math.sqrt(max(1, rows / cols))


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, adjust: str = "match_rms_adamw", ns_dtype=None):
        assert lr >= 0 and weight_decay >= 0 and 0 <= momentum < 1, f"need lr, weight_decay >= 0, 0 <= momentum < 1: {lr}, {weight_decay}, {momentum}"
        assert adjust in ("match_rms_adamw", "original"), f"adjust is match_rms_adamw or original, got {adjust!r}"
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      adjust=adjust))
        self.ns_dtype = ns_dtype  # None: newton_schulz's choice by device
        assert all(p.dim() == 2 for group in self.param_groups for p in group["params"]), "Muon takes 2-D matrices only"

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:  # a frozen matrix (LoRA's base)
                    continue
                m = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))  # M_{t-1}, saved with the checkpoint
                m.lerp_(p.grad, 1 - mu)  # M_t = mu M + (1 - mu) G
                u = p.grad.lerp(m, mu) if group["nesterov"] else m  # U_t = (1 - mu) G + mu M_t
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay
                o = newton_schulz(u, group["ns_steps"], dtype=self.ns_dtype)
                p.add_(o, alpha=-group["lr"] * lr_scale(p.shape, group["adjust"]))


class Combined:
    """Several optimizers stepped as one: what the training loop sees (param_groups, step, zero_grad, state_dict)."""

    def __init__(self, **optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict):
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def with_adamw(model, groups: list, adamw, lr: float, muon_lr: float) -> Combined:
    """Lesson 07's AdamW groups with the blocks' weight matrices taken out of the decayed group and given to Muon,
    at muon_lr on the loop's schedule (lr_scale: the loop multiplies its learning rate by it); LoRA's A and B
    (rank-r matrices, not a layer's weights) stay on AdamW."""
    blocks = {id(p) for name, p in model.named_parameters() if name.startswith("layers.") and name.endswith(".weight") and p.dim() == 2}
    decay = groups[0]
    matrices = [p for p in decay["params"] if id(p) in blocks]
    rest = dict(decay, params=[p for p in decay["params"] if id(p) not in blocks])
    return Combined(muon=Muon([{"params": matrices, "lr_scale": muon_lr / lr}], lr=muon_lr, weight_decay=decay["weight_decay"]),
                    adamw=adamw([rest, *groups[1:]]))


if __name__ == "__main__":
    torch.manual_seed(0)
    g = torch.randn(192, 512) @ torch.diag(torch.logspace(0, -2, 512))  # singular values spread over 100x
    before, after = torch.linalg.svdvals(g), torch.linalg.svdvals(newton_schulz(g, dtype=torch.bfloat16).float())
    print(f"singular values of G: {before.min():.3g} .. {before.max():.3g} (ratio {before.max() / before.min():.0f}); "
          f"of NS_5(G): {after.min():.3f} .. {after.max():.3f}")
    ours, theirs = [torch.nn.Parameter(torch.randn(64, 32)) for _ in range(2)]
    theirs.data.copy_(ours.data)
    mine = Muon([ours], lr=0.02, ns_dtype=torch.bfloat16)  # torch's runs bfloat16 on every device
    ref = torch.optim.Muon([theirs], lr=0.02, adjust_lr_fn="match_rms_adamw")
    for step in range(5):
        grad = torch.randn(64, 32)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step(), ref.step()
    print(f"after 5 steps, max |ours - torch.optim.Muon| = {(ours - theirs).abs().max():.1e}")
    assert 0.6 < after.min() and after.max() < 1.25 and torch.equal(ours, theirs)
    print("checked: NS_5 puts every singular value in [0.6, 1.25], and the steps equal torch.optim.Muon's")
