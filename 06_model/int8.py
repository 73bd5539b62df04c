"""Int8 weight-only quantization for decoding: a quarter of the bytes per token, for batch-1 speed.

A one-token step reads every weight once for 2 FLOPs: memory, not arithmetic, sets its time (notes.md).

    s_n     = max_k |W[n, k]| / 127                   one scale per output channel (row of W), symmetric, bf16
    Wq[n,k] = round(W[n, k] / s_n)  in [-127, 127]    int8
    y       = (x Wq^T) * s                            == x (Wq * s)^T: the scale factors out of the row's dot product
    |W - Wq s| <= s / 2                               rounding to nearest, per weight

Only nn.Linear layers change; the embedding, norms and KV cache stay float32; inference only (save_model
refuses it). On CPU the product is aten's `_weight_int8pack_mm` with bf16 activations, for in_features a
multiple of KERNEL_MULTIPLE; other sizes and devices take the formula (the kernel's traps: notes.md).
Left out: int4, activation quantization, calibration (absmax per row is enough at 8 bits).

    python 06_model/int8.py                                  # the default config, random tokens
    python 06_model/int8.py --checkpoint out/ckpt_best         # the main job's model on its val tokens
"""

import argparse
import sys
import time
from importlib import import_module
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
lillm = import_module("06_model.model")
weights = import_module("06_model.weights")
generate = import_module("06_model.generate")
# aten's kernel walks rows in blocks: 16 weights wide with AVX-512, where 8 segfaults (torch 2.13), 8 without.
KERNEL_MULTIPLE = 16


class Int8Linear(nn.Module):
    """Replaces a bias-free nn.Linear(in_features, out_features): weight int8 (out, in), scale (out,)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        assert linear.bias is None, "lilLM has no biases; Int8Linear keeps none"
        w = linear.weight.detach().float()  # (out, in)
        # (out,) in bfloat16, the kernel's dtype, rounded BEFORE dividing so that Wq matches the scale used.
        # A zero row keeps a finite scale; a scale rounded down can push |W / s| past 127: clamp.
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
        wq = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
        self.register_buffer("weight", wq)
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out), in x's dtype
        if x.is_cpu and self.in_features % KERNEL_MULTIPLE == 0:
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (N, in) the kernel's fast input dtype
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scale)  # (N, out)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, per-row scale"


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear of `model` for an Int8Linear, in place (a tied head gets its own int8 copy;
    the embedding keeps the float matrix). Returns the model, in eval mode."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model.eval()


def equal_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def decode(model, prompt: list[int], n: int = 64) -> tuple[list[int], float]:
    """n greedy tokens after `prompt` at batch 1, eager, and their tokens/s (timed on a second, warm run)."""
    tokens = generate.generate(model, [prompt], n, stop_id=None)[0]
    t = time.perf_counter()
    generate.generate(model, [prompt], n, stop_id=None)
    return tokens, n / (time.perf_counter() - t)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Quantize a model's matrices to int8: the bytes, the error, the speed.")
    parser.add_argument("--checkpoint", help="a trained model (save_model file, out/ckpt_* or a Hugging Face export "
                        "directory); without one, the default config at initialization and random tokens")
    parser.add_argument("--tokens", default="data/shakespeare/val.bin", help="uint16 token file for the loss (with --checkpoint)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with weights.one_line_errors():
        model = weights.load_model(args.checkpoint) if args.checkpoint else lillm.LilLM(lillm.ModelConfig())
        T = model.config.max_seq_len
        ids = torch.randint(0, model.config.vocab_size, (4 * T + 1,))
        if args.checkpoint:  # every whole window of the token file: (N, T) inputs and their next tokens
            if not Path(args.tokens).is_file():
                raise FileNotFoundError(f"no token file at {args.tokens}: make it with python 01_tokenizer/prepare.py, or pass --tokens")
            ids = torch.from_numpy(np.fromfile(args.tokens, dtype=np.uint16).astype(np.int64))
            if len(ids) <= T:
                raise ValueError(f"{args.tokens} holds {len(ids)} tokens, fewer than one window of {T + 1}; pass a larger --tokens")
            if ids.max() >= model.config.vocab_size:
                raise ValueError(f"{args.tokens} holds token id {ids.max()}, beyond the model's vocab_size "
                                 f"{model.config.vocab_size}; pass the token file of this model's tokenizer")
    n = (len(ids) - 1) // T * T
    x, y = ids[:n].view(-1, T), ids[1 : n + 1].view(-1, T)  # (N, T)
    prompt = x[0, :16].tolist()
    model.eval()
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied matrix once
    with torch.no_grad():
        ref, ref_loss = model(x, y)
        ref_tokens, ref_speed = decode(model, prompt)
        quantize_int8(model)
        out, loss = model(x, y)
    int8_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    tokens, speed = decode(model, prompt)
    print(f"weights: {fp32_bytes / 1e6:.1f} MB float32 -> {int8_bytes / 1e6:.1f} MB (int8 matrices and their scales, "
          "the float32 embedding for lookups)")
    print(f"over {x.numel():,} {'tokens of ' + args.tokens if args.checkpoint else 'random tokens'}: logits off by "
          f"{((out - ref).norm() / ref.norm()).item():.2%} (relative), loss {ref_loss.item():.4f} float32 -> {loss.item():.4f} int8")
    print(f"greedy, {len(tokens)} tokens from a 16-token prompt: the first {equal_prefix(tokens, ref_tokens)} equal float32's")
    print(f"eager decoding at batch 1: {ref_speed:.0f} -> {speed:.0f} tokens/s "
          "(06_model/bench.py compares compiled steps with transformers)")


if __name__ == "__main__":
    main()
