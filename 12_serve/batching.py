"""Continuous batching: one running batch that requests join and leave at every decoding step.

A server gets requests at any time, with prompts of any length. Three ways to run them:

    one at a time   request 1 to its end, then request 2, ...          a step computes ONE token
    static          take what is waiting as a batch and run it until its LAST row ends; newcomers wait
    continuous      at every step: finished rows leave, waiting requests join (after their prefill), then
                    one decode step for all running rows (Yu et al., 2022, "Orca", OSDI '22)

A decode step reads every weight to compute one token per row, so a step for 16 rows costs far less
than 16 steps for one (2-3 times one step on this project's CPU, about one on a GPU): throughput grows
with the batch until the arithmetic, not the memory traffic, is the bottleneck (notes.md). Continuous
batching keeps the batch full without making anyone wait for the slowest row of a batch before theirs.

The rows of a continuous batch are at different positions, so each row carries its own:

    RoPE    row b's new query and key rotate by the angles of position pos[b]         rope_rows
    cache   row b writes its new key and value at K[b, pos[b]]
    mask    row b's query sees keys 0..pos[b] of its own row, -inf after (stale keys of an earlier request)

Lessons 05-06 keep one integer start_pos for the whole batch, unchanged; decode_rows is their forward
with these three changes. A joiner's prefill is lesson 06's own forward on its prompt alone, its keys
and values written straight into its row of the batch's cache (RowCache).

Isolation: whatever belongs to one row (its prefill, its sampling, handing its token out) fails for that
row alone, which ends with finish_reason "error" while the others go on; only a failure of the batched
decode step itself, which no single row owns, ends every row.

Layout: per layer, K and V are (max_batch, max_seq_len, n_kv_heads, head_dim); rows 0..n-1 are the
running batch (a row that leaves is replaced by the last one, so the batch is always a prefix).
Left out on purpose (what vLLM and SGLang add, notes.md): a paged KV cache (blocks allocated as a
sequence grows, instead of max_seq_len positions per row), prefix caching, chunked prefill, prefill of
several joiners in one forward, preemption, speculative decoding.

Demo: python 12_serve/batching.py
"""

import queue
import secrets
import sys
import threading
import traceback
from importlib import import_module
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
generate = import_module("06_model.generate")


def rope_rows(x: torch.Tensor, table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Lesson 03's apply_rope with one position per row: x (B, 1, H, D), row b rotated as position pos[b]."""
    B, T, H, D = x.shape
    cos, sin = table[pos].unbind(-1)  # each (B, D/2): row b's angles
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]  # (B, 1, 1, D/2) broadcast over T = 1 and heads
    x_even, x_odd = x.float().reshape(B, T, H, D // 2, 2).unbind(-1)  # each (B, 1, H, D/2)
    rotated = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)  # (B, 1, H, D/2, 2)
    return rotated.flatten(3).type_as(x)  # (B, 1, H, D)


def decode_rows(model, tokens: torch.Tensor, pos: list, ks: list, vs: list) -> torch.Tensor:
    """One decoding step for n rows at their own positions: tokens (n,) at positions pos -> logits (n, vocab).

    ks, vs: per layer, the batch's cache rows (n, max_seq_len, n_kv, hd); row b's keys 0..pos[b]-1 are there.
    """
    n = tokens.shape[0]
    rows, at = torch.arange(n, device=tokens.device), torch.tensor(pos, device=tokens.device)  # (n,), (n,)
    t_k = max(pos) + 1  # the longest row; shorter rows mask what lies past their own position
    mask = (torch.arange(t_k, device=tokens.device)[None, :] <= at[:, None])[:, None, None, :]  # (n, 1, 1, t_k)
    h = model.tok_embeddings(tokens)[:, None]  # (n, 1, d_model)
    for layer, K, V in zip(model.layers, ks, vs):
        att = layer.attention
        x = layer.attention_norm(h)
        q = att.wq(x).view(n, 1, att.n_heads, att.head_dim)  # (n, 1, H, hd)
        k = att.wk(x).view(n, 1, att.n_kv_heads, att.head_dim)  # (n, 1, Hkv, hd)
        v = att.wv(x).view(n, 1, att.n_kv_heads, att.head_dim)  # (n, 1, Hkv, hd)
        q, k = rope_rows(q, model.rope_table, at), rope_rows(k, model.rope_table, at)
        K[rows, at], V[rows, at] = k[:, 0], v[:, 0]  # row b's new key and value at its own position
        y = F.scaled_dot_product_attention(  # (n, H, 1, hd)
            q.transpose(1, 2), K[:, :t_k].transpose(1, 2), V[:, :t_k].transpose(1, 2),  # (n, H or Hkv, 1 or t_k, hd)
            attn_mask=mask, enable_gqa=att.n_rep > 1)
        h = h + att.wo(y.transpose(1, 2).reshape(n, 1, -1))  # (n, 1, d_model); dropout is off in eval
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h))[:, 0]  # (n, vocab)


class RowCache:
    """Lesson 05's KVCache interface on one row of the batch's cache: a joiner's prefill writes there."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, row: int):
        self.k, self.v, self.row = k, v, row

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor):  # k, v (1, T, Hkv, hd)
        T = k.shape[1]
        self.k[self.row, start_pos:start_pos + T], self.v[self.row, start_pos:start_pos + T] = k[0], v[0]
        return self.k[self.row:self.row + 1, :start_pos + T], self.v[self.row:self.row + 1, :start_pos + T]


class Request:
    """One generation: prompt ids in; each new id out through emit(id), then emit(None) once it has ended.

    temperature 0 is greedy; otherwise the request samples with its own torch.Generator, seeded by `seed`
    (random when None), so a seeded request draws the same numbers whatever else is in the batch.
    """

    def __init__(self, prompt: list, max_new_tokens: int, temperature: float = 0.0, top_p: float | None = None,
                 seed: int | None = None, stop_id: int | None = None, emit=None):
        self.prompt, self.max_new_tokens, self.stop_id = list(prompt), max_new_tokens, stop_id
        self.temperature, self.top_p = temperature, top_p
        self.seed = secrets.randbits(63) if seed is None else seed
        self.emit = emit or (lambda token: None)
        self.tokens = []  # the new ids so far
        self.finish_reason = None  # "stop" (stop_id), "length" (max_new_tokens), "cancelled" or "error"
        self.error = None  # with "error": what failed, e.g. "sampling: RuntimeError"
        self.cancelled = False  # set from outside (client gone, stop string seen): the row leaves at the next step


class Engine:
    """The scheduler. step() is one iteration; run() loops it on a thread while requests arrive by submit()."""

    def __init__(self, model, max_batch: int = 16, max_waiting: int = 64, policy: str = "continuous"):
        assert policy in ("continuous", "static"), f"policy must be continuous or static, got {policy!r}"
        assert max_batch > 0 and max_waiting > 0, "max_batch and max_waiting must be positive"
        cfg, weight = model.config, model.tok_embeddings.weight
        self.model, self.max_batch, self.policy, self.device = model.eval(), max_batch, policy, weight.device
        self.waiting = queue.Queue(max_waiting)  # bounded: submit() raises queue.Full at once, never blocks
        self.arrived = threading.Event()  # wakes an idle run()
        self.rows, self.pos = [], []  # row i: its Request, and the position its last new token goes to
        shape = (max_batch, cfg.max_seq_len, cfg.kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in model.layers]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.steps = self.peak_rows = 0  # decode steps run, most rows in one step

    def submit(self, req: Request) -> None:
        cfg = self.model.config
        if not req.prompt or len(req.prompt) + req.max_new_tokens > cfg.max_seq_len or req.max_new_tokens < 1:
            raise ValueError(f"need a prompt and 1 <= max_new_tokens with prompt + max_new_tokens <= {cfg.max_seq_len}, "
                             f"got {len(req.prompt)} + {req.max_new_tokens}")
        if not all(0 <= t < cfg.vocab_size for t in req.prompt):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
        if not 0 <= req.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {req.seed}")
        self.waiting.put_nowait(req)
        self.arrived.set()

    @torch.inference_mode()
    def step(self) -> None:
        """Cancelled rows leave; waiting requests join (continuous: whenever a row is free; static: only into an
        empty batch); then one decode step computes the next token of every running row."""
        for i in reversed(range(len(self.rows))):
            if self.rows[i].cancelled:
                self._leave(i, "cancelled")
        admit = self.policy == "continuous" or not self.rows
        while admit and len(self.rows) < self.max_batch:
            try:
                self.join(self.waiting.get_nowait())
            except queue.Empty:
                break
        if not self.rows:
            return
        n = len(self.rows)
        tokens = torch.tensor([r.tokens[-1] for r in self.rows], device=self.device)  # (n,) each row's last token
        logits = decode_rows(self.model, tokens, self.pos, [k[:n] for k in self.k], [v[:n] for v in self.v])
        self.pos = [p + 1 for p in self.pos]
        self.steps, self.peak_rows = self.steps + 1, max(self.peak_rows, n)
        ended = [i for i in range(n) if self._take(i, logits[i])]
        for i in reversed(ended):  # from the end: the row moved into i is one already looked at
            self._leave(i, self.rows[i].finish_reason)

    @torch.inference_mode()
    def join(self, req: Request) -> None:
        """Prefill: the prompt through lesson 06's forward, alone, into the next free row; its first token out."""
        if req.cancelled:
            return self._end(req, "cancelled")
        i = len(self.rows)
        self.rows.append(req)
        self.pos.append(len(req.prompt))
        try:
            req.generator = torch.Generator(device=self.device).manual_seed(req.seed)
            caches = [RowCache(k, v, i) for k, v in zip(self.k, self.v)]
            logits, _ = self.model(torch.tensor([req.prompt], device=self.device), caches=caches)  # (1, T, vocab)
        except Exception as e:  # this row's own prefill: it alone fails (its cache row is rewritten by the next joiner)
            self._fail(req, "prefill", e)
            return self._leave(i, "error")
        if self._take(i, logits[0, -1]):
            self._leave(i, req.finish_reason)

    def sample(self, req: Request, logits: torch.Tensor) -> int:
        """One row's next token from its logits (vocab,): greedy, or drawn with the request's own generator."""
        return int(generate.sample_next(logits[None], req.temperature, None, req.top_p, req.generator))

    def _take(self, i: int, logits: torch.Tensor) -> bool:
        """Sample row i's next token, emit it; True if the row has now ended (its stop id, its length, or a failure)."""
        r = self.rows[i]
        try:
            token = self.sample(r, logits)
            r.tokens.append(token)
            r.emit(token)
        except Exception as e:  # this row's own sampling or delivery: it alone ends
            return self._fail(r, "sampling", e)
        if token == r.stop_id or len(r.tokens) >= r.max_new_tokens:
            r.finish_reason = "stop" if token == r.stop_id else "length"
            return True
        return False

    @staticmethod
    def _fail(req: Request, stage: str, e: Exception, log: bool = True) -> bool:
        """Mark one request failed (it leaves with "error" at once); the traceback goes to the server's log."""
        if log:
            traceback.print_exception(e)
        req.finish_reason, req.error = "error", f"{stage}: {type(e).__name__}"
        return True

    def _leave(self, i: int, reason: str) -> None:
        """Row i leaves; the last row moves into its place (its cache copied), so the rows stay 0..n-1."""
        req, last = self.rows[i], len(self.rows) - 1
        if i != last:
            p = self.pos[last]  # the moved row's keys and values are at positions 0..p-1
            for k, v in zip(self.k, self.v):
                k[i, :p], v[i, :p] = k[last, :p], v[last, :p]
            self.rows[i], self.pos[i] = self.rows[last], p
        self.rows.pop()
        self.pos.pop()
        self._end(req, reason)

    @staticmethod
    def _end(req: Request, reason: str) -> None:
        req.finish_reason = reason
        try:
            req.emit(None)
        except Exception as e:  # its own delivery failed: nobody left to tell, and no other row is concerned
            traceback.print_exception(e)

    def run(self, stop: threading.Event) -> None:
        """Step until `stop` is set; idle, wait for a request. A failing step ends its rows with "error", not the loop."""
        while not stop.is_set():
            if not self.rows and self.waiting.empty():
                self.arrived.wait(timeout=0.1)  # looked at again below: a request that came in between is not missed
                self.arrived.clear()
                continue
            try:
                self.step()
            except Exception as e:  # the batched step itself failed: no single row owns it, so every row ends
                traceback.print_exception(e)
                for req in self.rows:
                    self._fail(req, "decode step", e, log=False)
                while self.rows:
                    self._leave(len(self.rows) - 1, "error")


if __name__ == "__main__":
    import random
    import time

    torch.manual_seed(0)
    torch.set_num_threads(1)  # a fair, steady comparison on a shared machine
    lillm = import_module("06_model.model")
    model = lillm.LilLM(lillm.ModelConfig(d_model=256, n_layers=2, q_heads=8, kv_heads=4, max_seq_len=128)).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(16, 8192) for _ in range(rng.randint(4, 64))] for _ in range(16)]
    lengths = [rng.randint(4, 48) for _ in prompts]  # answers of different lengths, as a server sees them

    def serve(max_batch: int, policy: str):
        """One request arrives per step, the way requests reach a server (none of them stops early: stop_id None)."""
        engine, reqs = Engine(model, max_batch=max_batch, policy=policy), [Request(p, n) for p, n in zip(prompts, lengths)]
        start, arrived = time.perf_counter(), 0
        while arrived < len(reqs) or engine.rows or not engine.waiting.empty():
            if arrived < len(reqs):
                engine.submit(reqs[arrived])
                arrived += 1
            engine.step()
        return reqs, engine.steps, time.perf_counter() - start

    for name, max_batch, policy in [("one at a time", 1, "continuous"), ("static", 16, "static"), ("continuous", 16, "continuous")]:
        reqs, steps, seconds = serve(max_batch, policy)
        print(f"{name:>14}: {steps:4d} decode steps, {sum(lengths) / seconds:6.0f} tokens/s")
    alone = [generate.generate(model, [p], n, stop_id=None)[0] for p, n in zip(prompts, lengths)]
    assert all(r.tokens == a for r, a in zip(reqs, alone))
    print("checked: each continuous-batching answer equals lesson 06's generate on its prompt alone (greedy)")
