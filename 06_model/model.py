"""LilLM: the seed's 39.6M-parameter Llama-3-style decoder, assembled from lessons 02-05.

    h_0     = E[tokens]                                  token embedding (no position embedding: RoPE)
    h'_l    = h_{l-1} + Attention( RMSNorm(h_{l-1}) )    grouped-query attention with RoPE (05, 03)
    h_l     = h'_l    + SwiGLU( RMSNorm(h'_l) )          gated FFN (04)
    logits  = RMSNorm(h_L) E^T                           output head tied to the embedding

Pre-norm residual blocks (Xiong et al., 2020, arXiv:2002.04745) as in Llama (Touvron et al., 2023,
arXiv:2302.13971); no biases anywhere. Parameter names follow Meta's reference so a reader can put
the two side by side; lesson 06's hf.py maps them to Hugging Face's LlamaForCausalLM.

Also here: generation with a KV cache (greedy, temperature, top-k, top-p; a streaming form) and the
checkpoint format lessons 07 and 08 share (save_model / load_model: one safetensors file, config as JSON).

Layout: tokens (B, T) int64; activations (B, T, d_model); logits (B, T, vocab_size).
Left out on purpose: weight sharing across layers, MoE, mixed attention windows, beam search,
repetition penalties, dropping finished rows from the batch.

Demo: python 06_model/model.py
"""

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from importlib import import_module
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RMSNorm = import_module("02_rmsnorm.rmsnorm").RMSNorm
rope = import_module("03_rope.rope")
swiglu = import_module("04_swiglu.swiglu")
gqa = import_module("05_gqa.gqa")


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

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "max_seq_len", "q_heads", "kv_heads", "max_batch_size", "multiple_of"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.d_model % self.q_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by q_heads ({self.q_heads})")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"q_heads ({self.q_heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if (self.d_model // self.q_heads) % 2:
            raise ValueError(f"head_dim = d_model / q_heads = {self.d_model // self.q_heads} must be even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(f"norm_eps and rope_theta must be positive, got {self.norm_eps}, {self.rope_theta}")

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
        """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM paper's appendix B:
        6 N for the matmuls with weights (the embedding lookup is not a matmul, its tied use as the head is)
        plus 12 L T d for attention's two T x T matmuls (PaLM's count: the half a causal mask skips is not subtracted)."""
        T = seq_len or self.config.max_seq_len
        n_matmul = self.num_params() - sum(p.numel() for n, p in self.named_parameters() if p.dim() == 1)
        return 6 * n_matmul + 12 * self.config.n_layers * T * self.config.d_model

    def compute_logits(self, tokens, start_pos: int = 0, caches: list | None = None):
        """The network alone, no checks: tokens (B, T) -> logits (B, T, vocab)."""
        h = self.tok_embeddings(tokens)  # (B, T, d_model)
        for i, layer in enumerate(self.layers):
            h = layer(h, self.rope_table, start_pos, None if caches is None else caches[i])
        return self.output(self.norm(h))  # (B, T, vocab)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, start_pos: int = 0,
                caches: list | None = None, ignore_index: int = -100):
        """tokens (B, T) -> (logits (B, T, vocab), mean cross-entropy over targets != ignore_index, or None)."""
        B, T = tokens.shape
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} exceed max_seq_len {self.config.max_seq_len}")
        if not torch.compiler.is_compiling() and tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got [{tokens.min()}, {tokens.max()}]"
                             " (a tokenizer with a larger vocab than the model?)")
        logits = self.compute_logits(tokens, start_pos, caches)  # (B, T, vocab)
        loss = None
        if targets is not None:
            # Cross-entropy in float32: under bf16 autocast the logits are bf16 and log-softmax over
            # 8192 classes loses precision.
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
        return logits, loss

    @torch.inference_mode()
    def generate_stream(self, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                        top_p: float | None = None, stop_id: int | None = 2, generator: torch.Generator | None = None,
                        compile: bool = False):
        """Yield, at each decoding step, one entry per prompt: the row's new token id, or None where the row is
        still reading its prompt or has stopped (it produced `stop_id`, or max_new_tokens, or reached max_seq_len).

        prompts: a list of token-id lists, lengths may differ. Ragged batches as in Meta's llama: prefill every
        row up to the shortest prompt, then step the whole batch one position at a time; where a row still has
        prompt at that position its prompt token overrides the sample, so one integer start_pos serves all rows.
        compile: run the one-token steps through torch.compile (compiled once per model, for every position).
        """
        cfg, weight = self.config, self.tok_embeddings.weight
        B, lengths = len(prompts), [len(p) for p in prompts]
        if not 0 < B <= cfg.max_batch_size or min(lengths) == 0:
            raise ValueError(f"need 1..{cfg.max_batch_size} non-empty prompts, got {B} with lengths {lengths}")
        if max(lengths) > cfg.max_seq_len:
            raise ValueError(f"a prompt of {max(lengths)} tokens is longer than max_seq_len {cfg.max_seq_len}")
        if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError(f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
        total = min(cfg.max_seq_len, max(lengths) + max_new_tokens)  # no position past max_seq_len, ever
        tokens = torch.zeros(B, total, dtype=torch.long, device=weight.device)  # (B, total) prompts, then samples
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:  # now, not halfway through the stream
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
        length = torch.tensor(lengths, device=weight.device)  # (B,)
        # One cache per layer, sized to this call's batch and length, in the model's dtype.
        caches = [gqa.KVCache(B, total, cfg.kv_heads, cfg.head_dim, weight.dtype, weight.device) for _ in self.layers]
        done = torch.zeros(B, dtype=torch.bool, device=weight.device)
        if compile and "_decode_step" not in self.__dict__:
            # dynamic=True: one graph for every position and cache length, instead of one per position.
            self._decode_step = torch.compile(self.compute_logits, dynamic=True)
        was_training, prev = self.training, 0
        self.eval()  # no dropout while sampling; restored when the generator finishes or is closed
        try:
            for cur in range(min(lengths), total if max_new_tokens > 0 else 0):
                if compile and cur - prev == 1:  # one token; inputs were checked above, positions by `total`
                    logits = self._decode_step(tokens[:, prev:cur], prev, caches)
                else:  # the prefill: cur - prev tokens at once
                    logits, _ = self(tokens[:, prev:cur], start_pos=prev, caches=caches)
                in_prompt = length > cur
                nxt = torch.where(in_prompt, tokens[:, cur], sample_next(logits[:, -1], temperature, top_k, top_p, generator))
                tokens[:, cur] = nxt
                new = ~in_prompt & ~done
                yield [t if n else None for t, n in zip(nxt.tolist(), new.tolist())]
                done |= (new & (nxt == stop_id)) | (cur + 1 - length >= max_new_tokens)
                if done.all():
                    return
                prev = cur
        finally:
            self.train(was_training)

    def generate(self, prompts, max_new_tokens: int, **sampling) -> list[list[int]]:
        """The new tokens of each row (the stop token included when it was produced); arguments as generate_stream."""
        out = [[] for _ in prompts]
        for step in self.generate_stream(prompts, max_new_tokens, **sampling):
            for row, t in zip(out, step):
                if t is not None:
                    row.append(t)
        return out


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, vocab) -> next ids (B,). temperature 0 is greedy; otherwise sample softmax(logits / temperature)
    restricted to the top_k largest logits, then to the smallest set of tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, V)
        # Drop a token when the tokens ranked above it already reach top_p (the first one always stays).
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # multinomial renormalizes


# Checkpoints: one safetensors file, the tied matrix stored once, the plain config dict as JSON metadata.
# No pickled classes: their module paths start with digits and safetensors cannot run code when loaded.
TIED = "output.weight"  # the same tensor as tok_embeddings.weight


def write_safetensors(tensors: dict, path, metadata: dict) -> None:
    """safetensors' save_file, atomically: a temp file, then os.replace, so a crash mid-write never leaves a
    half-written file under the real name. The library creates its files 0600; they get the umask's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    umask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_model(model: LilLM, path) -> None:
    """Write model.state_dict() (the tied matrix once) and its config to `path`, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != TIED}
    if any(v.dtype == torch.int8 for v in state.values()):
        raise ValueError("this model was quantized to int8 for decoding (06_model/int8.py): save the float model "
                         "and quantize after load_model")
    write_safetensors(state, path, {"lillm_config": json.dumps(model.config.to_dict())})


def load_model(path, device="cpu") -> LilLM:
    """A float32 LilLM from a save_model file, a directory holding model.safetensors (the trainer's
    out/ckpt_*/), or a Hugging Face Llama export directory (config.json)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        return import_module("06_model.hf").import_hf(path, device)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train one with `python 07_pretrain_ddp/train.py` "
                                "or import a Llama export with `python 06_model/hf.py import`")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta, state = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-save it or use another checkpoint") from None
    if "lillm_config" not in meta:
        raise ValueError(f"{path} has no 'lillm_config' metadata: not written by save_model "
                         "(for a Hugging Face export, pass its directory)")
    try:
        config = ModelConfig(**json.loads(meta["lillm_config"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its config is not a valid ModelConfig ({e})") from None
    return build_from_state(config, state, device, str(path))


def build_from_state(config: ModelConfig, state: dict, device="cpu", source: str = "checkpoint") -> LilLM:
    """A LilLM with `config` holding exactly `state` (without the tied output.weight); a one-line error otherwise."""
    model = LilLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != TIED}
    got = {k: v.shape for k, v in state.items()}
    if expected != got:
        bad = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        detail = ", ".join(f"{k}: config {tuple(expected.get(k, ()))} vs weights {tuple(got.get(k, ()))}" for k in bad[:3])
        raise ValueError(f"{source}: the weights do not match its config ({len(bad)} tensors differ; {detail}); "
                         "the config and the weights must come from the same run")
    # Loaded into float32 parameters (a bf16 checkpoint upcasts exactly); model.to(dtype) would also round the
    # float32 RoPE table, so lower precision is left to autocast.
    model.to(device).load_state_dict({**state, TIED: state["tok_embeddings.weight"]})
    return model


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
