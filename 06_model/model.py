"""LilLM: the seed's 39.6M-parameter Llama-3-style decoder, assembled from lessons 02-05.

    h_0     = E[tokens]                                  token embedding (no position embedding: RoPE)
    h'_l    = h_{l-1} + Attention( RMSNorm(h_{l-1}) )    grouped-query attention with RoPE (05, 03)
    h_l     = h'_l    + SwiGLU( RMSNorm(h'_l) )          gated FFN (04)
    logits  = RMSNorm(h_L) E^T                           output head tied to the embedding

Pre-norm residual blocks (Xiong et al., 2020, arXiv:2002.04745) as in Llama (Touvron et al., 2023,
arXiv:2302.13971); no biases. Parameter names follow Meta's reference (hf.py maps them to Hugging Face's).
The network alone, as Meta keeps model.py apart from generation.py: sampling is generate.py, files weights.py.

Layout: tokens (B, T) int64; activations (B, T, d_model); logits (B, T, vocab_size).
Left out on purpose: weight sharing across layers, MoE, mixed attention windows.

Demo: python 06_model/model.py
"""

import math
import sys
from dataclasses import asdict, dataclass
from importlib import import_module
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RMSNorm = import_module("02_rmsnorm.rmsnorm").RMSNorm
rope = import_module("03_rope.rope")
swiglu = import_module("04_swiglu.swiglu")
gqa = import_module("05_gqa.gqa")


def check(ok: bool, message: str) -> None:
    """An assert that survives `python -O`: bad configs come from users, not from bugs."""
    if not ok:
        raise ValueError(message)


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 512
    n_layers: int = 12
    max_seq_len: int = 512
    q_heads: int = 16
    kv_heads: int = 8
    max_batch_size: int = 32  # the largest batch generate() accepts (the cache is sized per call)
    multiple_of: int = 128
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    dropout: float = 0.0

    def __post_init__(self):  # invalid configs fail here, with the rule they break, not deep inside a layer
        for name in ("vocab_size", "d_model", "n_layers", "max_seq_len", "q_heads", "kv_heads", "max_batch_size", "multiple_of"):
            value = getattr(self, name)
            check(isinstance(value, int) and value > 0, f"ModelConfig.{name} must be a positive integer, got {value!r}")
        check(self.d_model % self.q_heads == 0, f"d_model ({self.d_model}) must be divisible by q_heads ({self.q_heads})")
        check(self.q_heads % self.kv_heads == 0, f"q_heads ({self.q_heads}) must be a multiple of kv_heads ({self.kv_heads})")
        check(self.head_dim % 2 == 0, f"head_dim = d_model / q_heads = {self.head_dim} must be even for RoPE")
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.norm_eps > 0 and self.rope_theta > 0, f"norm_eps and rope_theta must be positive, got {self.norm_eps}, {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.q_heads

    @property
    def hidden_dim(self) -> int:
        return swiglu.ffn_hidden_dim(self.d_model, self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = gqa.GroupedQueryAttention(cfg.d_model, cfg.q_heads, cfg.kv_heads, cfg.dropout)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = swiglu.SwiGLU(cfg.d_model, cfg.hidden_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope_table, start_pos=0, cache=None):  # (B, T, d_model) -> (B, T, d_model)
        x = x + self.dropout(self.attention(self.attention_norm(x), rope_table, start_pos, cache))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class LilLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied: one (vocab, d_model) matrix reads and writes tokens
        # Not a parameter and not saved: rebuilt from the config, moved with .to(device).
        self.register_buffer("rope_table", rope.precompute_rope(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """N(0, 0.02) for every matrix (GPT-2); the two projections that write into the residual stream
        (wo, w2) get 0.02 / sqrt(2 n_layers) so the stream's variance does not grow with depth."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * self.config.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            else:
                nn.init.ones_(p)  # RMSNorm gains

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied matrix is counted once

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, PaLM's appendix B: 6 N_matmul + 12 L T d (attention's two T x T products; notes.md)."""
        T = seq_len or self.config.max_seq_len
        n_matmul = self.num_params() - sum(p.numel() for n, p in self.named_parameters() if p.dim() == 1)
        return 6 * n_matmul + 12 * self.config.n_layers * T * self.config.d_model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, start_pos: int = 0,
                caches: list | None = None, ignore_index: int = -100):
        """tokens (B, T) -> (logits (B, T, vocab), mean cross-entropy over targets != ignore_index, or None).
        Token ids are checked where they enter, not here: it would make a GPU wait for the host (notes.md)."""
        B, T = tokens.shape
        if start_pos + T > self.config.max_seq_len:  # plain ints: no sync, and one guard under torch.compile
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} exceed max_seq_len {self.config.max_seq_len}")
        h = self.tok_embeddings(tokens)  # (B, T, d_model)
        for i, layer in enumerate(self.layers):
            h = layer(h, self.rope_table, start_pos, None if caches is None else caches[i])
        logits = self.output(self.norm(h))  # (B, T, vocab)
        loss = None
        if targets is not None:
            # In float32: under bf16 autocast the logits are bf16, and log-softmax over 8192 classes loses precision.
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
        return logits, loss


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = LilLM(cfg).eval()
    n = model.num_params()
    print(f"default config: {n:,} parameters (the seed's count is 39,596,544)")
    tokens, targets = torch.randint(0, cfg.vocab_size, (2, 2, 64))
    expected = math.log(cfg.vocab_size) + 0.02**2 * cfg.d_model / 2  # ln V + sigma^2 / 2, see notes.md
    with torch.no_grad():
        _, loss = model(tokens, targets=targets)
        print(f"loss at initialization: {loss.item():.3f}  (ln V + sigma^2/2 = {expected:.3f}, ln V = {math.log(cfg.vocab_size):.3f})")
    assert n == 39_596_544 and abs(loss.item() - expected) < 0.05
    print("checked: parameter count, and the loss at initialization is that of near-uniform logits")
