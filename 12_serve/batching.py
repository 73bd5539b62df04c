"""Continuous batching (Yu et al., 2022, "Orca", OSDI '22): one running batch that requests join and leave
at every decoding step.

    forever:                                                                 Engine.run -> Engine.step
        leave   rows that have ended or were cancelled give their row back   (the last row moves into it)
        join    while a row is free, waiting prompts are prefilled into free rows' caches (together, in one forward)
        step    ONE decode step computes the next token of every running row, each at its own position

A decode step reads every weight to compute one token per row, so a step for 16 rows costs far less than
16 steps for one: throughput grows with the batch (notes.md). Static batching (policy "static") admits
only into an empty batch, so newcomers wait for its slowest row; continuous batching never does.

The rows stand at different positions pos[b], so decode_rows is lesson 06's forward for one token per row
with three changes: RoPE at pos[b] (lesson 03's apply_rope with a (B,) position tensor), the new key and
value written at K[b, pos[b]], and a mask that shows row b keys 0..pos[b] only (past them lie the keys of
the row's previous request). Whatever belongs to one row (its prefill, sampling, delivery) fails for that
row alone, with finish_reason "error"; only a failure of the batched step ends every row.

Layout: per layer, K and V are (max_batch, max_seq_len, n_kv_heads, head_dim); rows 0..n-1 are running.
Left out on purpose (notes.md): a paged KV cache, prefix caching, preemption, speculative decoding.

Demo: python 12_serve/batching.py
"""

import queue
import secrets
import sys
import threading
import time
import traceback
from importlib import import_module
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
rope = import_module("03_rope.rope")
generate = import_module("06_model.generate")


class Request:
    """One generation: prompt ids in; each new id out through emit(id), then emit(None) once it has ended.
    temperature 0 is greedy; otherwise it samples with its own generator seeded by `seed` (random when None),
    so a seeded request draws the same numbers whatever else is in the batch."""

    def __init__(self, prompt: list, max_new_tokens: int, temperature: float = 0.0, top_p: float | None = None,
                 seed: int | None = None, stop_id: int | None = None, emit=None):
        self.prompt, self.max_new_tokens, self.stop_id = list(prompt), max_new_tokens, stop_id
        self.temperature, self.top_p, self.emit = temperature, top_p, emit or (lambda token: None)
        self.seed = secrets.randbits(63) if seed is None else seed
        self.tokens = []  # the new ids so far
        self.finish_reason = None  # "stop" (stop_id), "length" (max_new_tokens), "cancelled" or "error"
        self.error = None  # with "error": what failed, e.g. "sampling: RuntimeError"
        self.cancelled = False  # set from outside (client gone, stop string seen): the row leaves at the next step
        self.generator = None  # made at its first sampling, on the model's device


class Engine:
    """The scheduler: run() loops step() on one thread while requests arrive through submit().

    Two costs a naive engine pays at every step are avoided, both named in notes.md (where the time goes):
    prefill of one joiner at a time (here, every waiting prompt that fits the step's prefill budget joins in
    one forward) and a long prompt that freezes the batch for its whole prefill (here, a prompt longer than
    the budget is prefilled in chunks of at most `prefill_tokens` per step, in a row set aside for it, and
    joins when its last chunk is done). So a step's prefill work is bounded: at most prefill_tokens prompt
    tokens, about one decode step's worth at the default, and running rows never wait longer than that."""

    def __init__(self, model, max_batch: int = 16, max_waiting: int = 64, policy: str = "continuous", prefill_tokens: int = 64):
        assert policy in ("continuous", "static"), f"policy must be continuous or static, got {policy!r}"
        assert max_batch > 0 and max_waiting > 0 and prefill_tokens > 0, "max_batch, max_waiting and prefill_tokens must be positive"
        cfg, weight = model.config, model.tok_embeddings.weight
        self.model, self.max_batch, self.policy, self.device = model.eval(), max_batch, policy, weight.device
        self.prefill_tokens = prefill_tokens
        self.waiting = queue.Queue(max_waiting)  # bounded: submit() raises queue.Full at once, never blocks
        self.head = None  # a waiting request taken from the queue that did not fit this step: it goes first next step
        self.arrived = threading.Event()  # wakes an idle run()
        self.rows, self.pos = [], []  # row i: its Request; the position of its last token (its key is written there next step)
        self.filling, self.filled = None, 0  # a long prompt prefilled chunk by chunk in row max_batch - 1; its tokens done
        shape = (max_batch, cfg.max_seq_len, cfg.kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=weight.dtype, device=self.device) for _ in model.layers]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.steps = self.peak_rows = self.prefilled = 0  # decode steps, most rows in one step, prompt tokens of the last step
        self.prefill_seconds = 0.0  # spent in join(), where every prefill runs (bench.py: prefill's share)

    def submit(self, req: Request) -> None:
        cfg = self.model.config
        if not req.prompt or req.max_new_tokens < 1 or len(req.prompt) + req.max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"need a prompt and 1 <= max_new_tokens with prompt + max_new_tokens <= {cfg.max_seq_len}, "
                             f"got {len(req.prompt)} + {req.max_new_tokens}")
        if not all(0 <= t < cfg.vocab_size for t in req.prompt):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
        if not 0 <= req.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {req.seed}")
        self.waiting.put_nowait(req)
        self.arrived.set()

    def queued(self) -> int:
        """Requests admitted but not decoding yet: in the queue, first in line, or being prefilled in chunks."""
        return self.waiting.qsize() + (self.head is not None) + (self.filling is not None)

    def busy(self) -> bool:
        return bool(self.rows) or self.queued() > 0

    def run(self, stop: threading.Event) -> None:
        """Step until `stop` is set; idle, wait for a request."""
        while not stop.is_set():
            if not self.busy():
                self.arrived.wait(timeout=0.1)  # looked at again below: a request that came in between is not missed
                self.arrived.clear()
                continue
            try:
                self.step()
            except Exception as e:  # the batched step itself failed: no single row owns it, so every row ends
                traceback.print_exception(e)
                while self.rows:
                    self.rows[-1].error = f"decode step: {type(e).__name__}"
                    self._leave(len(self.rows) - 1, "error")

    @torch.inference_mode()
    def step(self) -> None:
        """Leave, join (continuous: whenever a row is free; static: only into an empty batch), one decode step."""
        for i in reversed(range(len(self.rows))):
            if self.rows[i].cancelled:
                self._leave(i, "cancelled")
        if self.filling is not None and self.filling.cancelled:
            self.filling = self._end(self.filling, "cancelled")
        self.prefilled, start = 0, time.perf_counter()
        if self.policy == "continuous" or not self.rows:
            self.join()
        self.prefill_seconds += time.perf_counter() - start
        if not self.rows:
            return
        n = len(self.rows)
        tokens = torch.tensor([r.tokens[-1] for r in self.rows], device=self.device)  # (n,) each row's last token
        logits = decode_rows(self.model, tokens, self.pos, [k[:n] for k in self.k], [v[:n] for v in self.v])
        self.pos = [p + 1 for p in self.pos]
        self.steps, self.peak_rows = self.steps + 1, max(self.peak_rows, n)
        self._take(0, logits)

    def join(self) -> None:
        """This step's prefill, at most prefill_tokens prompt tokens: first the long prompt being filled, then every
        waiting prompt that fits what is left, all in one forward, then the first chunk of the next long one."""
        budget = self.prefill_tokens
        if self.filling is not None:
            budget = self._fill(budget)
        joiners = []
        while self.filling is None and len(self.rows) + len(joiners) < self.max_batch:
            req = self.head or (self.waiting.get_nowait() if not self.waiting.empty() else None)  # this thread alone takes
            self.head = None
            if req is None:
                break
            if req.cancelled:
                self._end(req, "cancelled")
            elif len(req.prompt) <= budget:  # fits: joins now, with the others
                joiners.append(req)
                budget -= len(req.prompt)
            elif joiners or budget < self.prefill_tokens:  # would fit a fresh step: first in line for the next one
                self.head = req
                break
            else:  # longer than a whole budget: prefilled in chunks, in the row set aside
                self.filling, self.filled = req, 0
                budget = self._fill(budget)
        if joiners:
            self._prefill(joiners)

    def _prefill(self, reqs: list) -> None:
        """Whole prompts through lesson 06's forward as one right-padded batch, into the next free rows; each one's
        first token out. A failure is that of these joiners: each is tried alone, so it ends the faulty one only."""
        i, lengths = len(self.rows), [len(r.prompt) for r in reqs]
        ids = torch.zeros(len(reqs), max(lengths), dtype=torch.long, device=self.device)  # (m, T) padded after: causal, unseen
        for j, r in enumerate(reqs):
            ids[j, : lengths[j]] = torch.tensor(r.prompt, device=self.device)
        try:
            logits, _ = self.model(ids, caches=[RowCache(k, v, i, len(reqs)) for k, v in zip(self.k, self.v)])  # (m, T, V)
        except Exception as e:
            if len(reqs) == 1:
                self._fail(reqs[0], "prefill", e)
                return self._end(reqs[0], "error")
            for r in reqs:
                self._prefill([r])
            return
        self.prefilled += sum(lengths)
        self.rows += reqs
        self.pos += lengths
        self._take(i, logits[torch.arange(len(reqs)), torch.tensor(lengths) - 1])  # (m, V) each prompt's last position

    def _fill(self, budget: int) -> int:
        """The next chunk of the long prompt into row max_batch - 1 (at its own positions: lesson 06's start_pos); when
        its last chunk is done it moves to the next free row and joins. Returns the budget left."""
        req, slot = self.filling, self.max_batch - 1
        chunk = req.prompt[self.filled : self.filled + budget]
        if not chunk:
            return budget
        try:
            logits, _ = self.model(torch.tensor([chunk], device=self.device), start_pos=self.filled,
                                   caches=[RowCache(k, v, slot) for k, v in zip(self.k, self.v)])  # (1, chunk, V)
        except Exception as e:
            self._fail(req, "prefill", e)
            self.filling = self._end(req, "error")
            return budget
        self.filled, self.prefilled = self.filled + len(chunk), self.prefilled + len(chunk)
        if self.filled == len(req.prompt):  # done: into the next free row, its keys and values copied there
            self._copy_row(slot, len(self.rows), self.filled)
            self.rows.append(req)
            self.pos.append(self.filled)
            self.filling = None
            self._take(len(self.rows) - 1, logits[:, -1])
        return budget - len(chunk)

    def sample(self, req: Request, logits: torch.Tensor) -> int:
        """One row's next id from its logits (vocab,): drawn with the request's own generator (temperature > 0)."""
        req.generator = req.generator or torch.Generator(device=self.device).manual_seed(req.seed)
        return int(generate.sample_next(logits[None], req.temperature, None, req.top_p, req.generator))

    def _take(self, first: int, logits: torch.Tensor) -> None:
        """The next token of rows first..n-1 from logits (n - first, V), handed out: every greedy row in one argmax and
        one transfer, each sampling row with its own generator. Then the rows that have ended leave (stop id, length,
        or a failure of their own sampling or delivery, which ends that row alone)."""
        greedy = logits.argmax(dim=-1).tolist()  # one read for the whole batch
        for j, token in enumerate(greedy):
            r = self.rows[first + j]
            try:
                r.tokens.append(token if r.temperature == 0 else self.sample(r, logits[j]))
                r.emit(r.tokens[-1])
            except Exception as e:
                self._fail(r, "sampling", e)
            if r.finish_reason is None and (r.tokens[-1] == r.stop_id or len(r.tokens) >= r.max_new_tokens):
                r.finish_reason = "stop" if r.tokens[-1] == r.stop_id else "length"
        for i in reversed(range(first, len(self.rows))):  # from the end: the row moved into i is one already looked at
            if self.rows[i].finish_reason is not None:
                self._leave(i, self.rows[i].finish_reason)

    @staticmethod
    def _fail(req: Request, stage: str, e: Exception) -> None:
        traceback.print_exception(e)  # to the server's log; the request leaves with "error"
        req.finish_reason, req.error = "error", f"{stage}: {type(e).__name__}"

    def _copy_row(self, src: int, dst: int, p: int) -> None:
        """Row src's keys and values at positions 0..p-1 into row dst."""
        if src != dst:
            for k, v in zip(self.k, self.v):
                k[dst, :p], v[dst, :p] = k[src, :p], v[src, :p]

    def _leave(self, i: int, reason: str) -> None:
        """Row i leaves; the last row moves into its place (its cache copied), so the rows stay 0..n-1."""
        req = self.rows[i]
        self._copy_row(len(self.rows) - 1, i, self.pos[-1])
        self.rows[i], self.pos[i] = self.rows[-1], self.pos[-1]
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


def decode_rows(model, tokens: torch.Tensor, pos: list, ks: list, vs: list) -> torch.Tensor:
    """One decode step for n rows at their own positions: tokens (n,) at positions pos -> logits (n, vocab).
    ks, vs: per layer, the running rows' caches (n, max_seq_len, n_kv, hd), row b's keys 0..pos[b]-1 filled."""
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
        q, k = rope.apply_rope(q, model.rope_table, at), rope.apply_rope(k, model.rope_table, at)  # row b at pos[b]
        K[rows, at], V[rows, at] = k[:, 0], v[:, 0]  # row b's new key and value at its own position
        y = F.scaled_dot_product_attention(  # (n, H, 1, hd)
            q.transpose(1, 2), K[:, :t_k].transpose(1, 2), V[:, :t_k].transpose(1, 2),  # (n, H or Hkv, 1 or t_k, hd)
            attn_mask=mask, enable_gqa=att.n_rep > 1)
        h = h + att.wo(y.transpose(1, 2).reshape(n, 1, -1))  # (n, 1, d_model); dropout is off in eval
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h))[:, 0]  # (n, vocab)


class RowCache:
    """Lesson 05's KVCache interface on rows row..row+count-1 of the batch's cache: joiners' prefill writes there."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, row: int, count: int = 1):
        self.k, self.v, self.rows = k, v, slice(row, row + count)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor):  # k, v (count, T, Hkv, hd)
        end = start_pos + k.shape[1]
        self.k[self.rows, start_pos:end], self.v[self.rows, start_pos:end] = k, v
        return self.k[self.rows, :end], self.v[self.rows, :end]


if __name__ == "__main__":
    import random

    torch.manual_seed(0)
    torch.set_num_threads(1)  # a fair, steady comparison on a shared machine
    lillm = import_module("06_model.model")
    model = lillm.LilLM(lillm.ModelConfig(d_model=256, n_layers=2, q_heads=8, kv_heads=4, max_seq_len=128)).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(16, 8192) for _ in range(rng.randint(4, 64))] for _ in range(16)]
    lengths = [rng.randint(4, 48) for _ in prompts]  # answers of different lengths, as a server sees them

    for name, max_batch, policy in [("one at a time", 1, "continuous"), ("static", 16, "static"), ("continuous", 16, "continuous")]:
        engine, reqs = Engine(model, max_batch, policy=policy), [Request(p, n) for p, n in zip(prompts, lengths)]
        start = time.perf_counter()
        for i in range(10**6):  # one request arrives per step, as requests reach a server (none stops early)
            if i < len(reqs):
                engine.submit(reqs[i])
            elif not engine.busy():
                break
            engine.step()
        print(f"{name:>14}: {engine.steps:4d} decode steps, {sum(lengths) / (time.perf_counter() - start):6.0f} tokens/s")
    alone = [generate.generate(model, [p], n, stop_id=None)[0] for p, n in zip(prompts, lengths)]
    assert all(r.tokens == a for r, a in zip(reqs, alone))
    print("checked: each continuous-batching answer equals lesson 06's generate on its prompt alone (greedy)")
