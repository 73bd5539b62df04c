"""Scoring a model on a task: multiple choice by log-likelihood, and exact greedy continuation.

Multiple choice (HellaSwag, ARC, CORE's tasks). For a context c and choices a_1..a_n, each of tokens
a_j = (t_1..t_m), the model's log-probability of the choice is

    ll(a_j) = sum_k log p(t_k | c, t_<k)          one forward pass of c + a_j, read at a_j's positions

and the prediction is argmax_j of ll (lm-eval's `acc`), of ll / m (per token, nanochat's CORE), or of
ll / bytes(a_j) (lm-eval's `acc_bytes`; its `acc_norm` divides by characters, the same on ASCII text).
The sum favours short choices (every token costs probability); the normalized forms undo that when
the choices differ in length for reasons that have nothing to do with the answer (notes.md).
Chance is 1/n; centered accuracy (CORE) puts chance at 0 and a perfect score at 1:

    centered = (acc - base) / (1 - base)

Exact continuation (LAMBADA): a greedy continuation counts only if its tokens are the target's. Decoding
len(target) tokens greedily equals the harness's `is_greedy` test (every target token is the argmax
given the ones before it): both fail at the first position where the target is not the argmax.

Tokens are lm-evaluation-harness's: trailing whitespace of the context moves to the continuation, the
pair is encoded whole and split at the context's length (a merge across the join would otherwise make
tokens the model never sees), and an input longer than max_seq_len + 1 loses tokens on the left.

Batching: requests are right-padded to one length (causal attention: a token never sees the padding
after it). Prefix sharing: requests with the same context run it once, then all their choices at
once against a copy of its KV cache (lesson 05). Neither changes a score (tested).

Layout: ids are lists of ints; logits (B, T, vocab).
Demo: python 09_eval/score.py
"""

import sys
from importlib import import_module
from itertools import groupby
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
gqa = import_module("05_gqa.gqa")
generate = import_module("06_model.generate")


def encode_pair(tokenizer, context: str, continuation: str, prefix: tuple = ()) -> tuple:
    """(context ids, continuation ids) as the harness makes them (api/model.py _encode_pair), after `prefix` ids."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # "...the " + "question" -> "...the" + " question": GPT-2 tokens carry their leading space
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    ctx = tokenizer.encode(context, add_special_tokens=False).ids
    return [*prefix, *ctx], whole[len(ctx):]


def _read(logits, row: int, start: int, cont: list) -> tuple:
    """Sum of log p(cont) from logits[row, start : start + len(cont)] (the positions predicting cont), is-greedy."""
    logp = F.log_softmax(logits[row, start : start + len(cont)].float(), dim=-1)  # (m, V)
    target = torch.tensor(cont, device=logp.device)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


@torch.no_grad()
def _plain(model, requests, batch_size: int) -> list:
    """One row per request: (context + continuation)[-(L + 1):][:-1], right-padded into batches."""
    L, device, out = model.config.max_seq_len, model.tok_embeddings.weight.device, []
    for i in range(0, len(requests), batch_size):
        rows = [(ctx + cont)[-(L + 1):][:-1] for ctx, cont in requests[i : i + batch_size]]
        x = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long, device=device)  # (B, T) pad id 0
        for b, r in enumerate(rows):
            x[b, : len(r)] = torch.tensor(r)
        logits, _ = model(x)  # (B, T, V)
        for b, (r, (_, cont)) in enumerate(zip(rows, requests[i : i + batch_size])):
            out.append(_read(logits, b, len(r) - len(cont), cont))
    return out


@torch.no_grad()
def _shared(model, ctx: list, conts: list) -> list:
    """The context once (batch 1) into a KV cache, copied to one row per continuation; then every
    continuation at once from position len(ctx). Only called when everything fits max_seq_len."""
    cfg, w = model.config, model.tok_embeddings.weight
    n, T = len(conts), len(ctx) + max(map(len, conts))
    caches = [gqa.KVCache(n, T, cfg.kv_heads, cfg.head_dim, w.dtype, w.device) for _ in model.layers]
    ctx_logits, _ = model(torch.tensor([ctx], device=w.device), caches=caches)  # (1, Tc, V)
    for c in caches:  # row 0 holds the context's keys and values: every row starts from them
        c.k[:, : len(ctx)], c.v[:, : len(ctx)] = c.k[:1, : len(ctx)], c.v[:1, : len(ctx)]
    x = torch.zeros(n, max(map(len, conts)), dtype=torch.long, device=w.device)  # (n, m_max)
    for j, cont in enumerate(conts):
        x[j, : len(cont)] = torch.tensor(cont)
    logits, _ = model(x, start_pos=len(ctx), caches=caches)  # (n, m_max, V)
    # The first continuation token is predicted by the context's last position, the rest by the choice's own.
    logits = torch.cat([ctx_logits[:, -1:].expand(n, 1, -1), logits], dim=1)  # (n, m_max + 1, V)
    return [_read(logits, j, 0, cont) for j, cont in enumerate(conts)]


def loglikelihoods(model, requests, batch_size: int = 16, share_prefix: bool = True) -> list:
    """[(log p(continuation | context), is_greedy)] for requests [(context ids, continuation ids)], in order.
    Every continuation must have at least one token, every context too (a </s> or <s> will do)."""
    if any(not ctx or not cont for ctx, cont in requests):
        raise ValueError("every request needs a non-empty context and continuation (start contexts with </s>)")
    longest = max((len(cont) for _, cont in requests), default=0)
    if longest > model.config.max_seq_len:  # lm-eval's limit too: the window must hold every scored token
        raise ValueError(f"a continuation of {longest} tokens is longer than the model's window of "
                         f"{model.config.max_seq_len}: it cannot be scored (shorten the choices)")
    was_training = model.training
    model.eval()
    try:
        if not share_prefix:
            return _plain(model, list(requests), batch_size)
        out, L = [], model.config.max_seq_len
        for ctx, group in groupby(requests, key=lambda r: tuple(r[0])):  # consecutive requests, same context
            conts = [cont for _, cont in group]
            fits = len(ctx) + max(map(len, conts)) <= L and len(conts) <= model.config.max_batch_size
            out += _shared(model, list(ctx), conts) if fits else _plain(model, [(list(ctx), c) for c in conts], batch_size)
        return out
    finally:
        model.train(was_training)


def argmax(values) -> int:
    """The index of the largest value, the first on ties (numpy's argmax, which the harness uses)."""
    return max(range(len(values)), key=lambda j: (values[j], -j))


def predict(lls: list, n_tokens: list, n_bytes: list) -> dict:
    """The choice each rule picks: sum (`acc`), per token (`acc_token`), per byte (`acc_bytes`)."""
    return {"acc": argmax(lls), "acc_token": argmax([ll / m for ll, m in zip(lls, n_tokens)]),
            "acc_bytes": argmax([ll / max(b, 1) for ll, b in zip(lls, n_bytes)])}


def centered(acc: float, base: float) -> float:
    """CORE's centering: 0 at chance, 1 at perfect."""
    return (acc - base) / (1 - base)


@torch.no_grad()
def greedy_matches(model, prompts: list, targets: list, stop_id: int | None = None) -> list:
    """For each (prompt ids, target ids): does greedy decoding of len(target) tokens give exactly the target?
    Through lesson 06's generate, batched by the model's max_batch_size; prompts lose tokens on the left to fit."""
    L, B, out = model.config.max_seq_len, model.config.max_batch_size, []
    if any(not p or not 0 < len(t) < L for p, t in zip(prompts, targets)):
        raise ValueError(f"every prompt needs a token and every target 1..{L - 1} tokens (max_seq_len {L})")
    for i in range(0, len(prompts), B):
        rows = [(p[-(L - len(t)):], t) for p, t in zip(prompts[i : i + B], targets[i : i + B])]
        for m in sorted({len(t) for _, t in rows}):  # one call per target length: each row decodes exactly len(t)
            idx = [k for k, (_, t) in enumerate(rows) if len(t) == m]
            got = generate.generate(model, [rows[k][0] for k in idx], m, temperature=0.0, stop_id=stop_id)
            out += [(i + k, got_k[:m] == rows[k][1]) for k, got_k in zip(idx, got)]
    return [ok for _, ok in sorted(out)]


if __name__ == "__main__":
    lillm = import_module("06_model.model")
    torch.manual_seed(0)
    model = lillm.LilLM(lillm.ModelConfig(vocab_size=64, d_model=32, n_layers=2, max_seq_len=32, q_heads=4, kv_heads=2, multiple_of=16))
    ctx, conts = [1, 5, 9, 12], [[3], [7, 8], [20, 21, 22]]
    requests = [(ctx, c) for c in conts]
    shared, plain = loglikelihoods(model, requests), loglikelihoods(model, requests, batch_size=1, share_prefix=False)
    for c, (a, _), (b, _) in zip(conts, shared, plain):
        print(f"choice {c}: log p = {a:.5f} (context shared, batched) vs {b:.5f} (one at a time)")
    lls = [ll for ll, _ in shared]
    print(f"picked: sum -> {predict(lls, [1, 2, 3], [1, 2, 3])['acc']}; centered accuracy of 0.5 with 4 choices = {centered(0.5, 0.25):.3f}")
    assert all(abs(a - b) < 1e-4 for (a, _), (b, _) in zip(shared, plain)) and argmax(lls) == max(range(3), key=lls.__getitem__)
    print("checked: sharing the context's KV cache and batching give the scores of one pass per choice")
