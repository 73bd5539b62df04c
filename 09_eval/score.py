"""Scoring a model on a task: multiple choice by log-likelihood, and exact greedy continuation.

Multiple choice (HellaSwag, ARC, CORE's tasks): for a context c and a choice a_j = (t_1..t_m),

    ll(a_j)  = sum_k log p(t_k | c, t_<k)       one forward pass of c + a_j, read at a_j's positions
    pick     = argmax_j ll (`acc`) | ll / m (`acc_token`, CORE) | ll / bytes(a_j) (lm-eval's `acc_bytes`)
    centered = (acc - chance) / (1 - chance)     CORE: 0 at chance, 1 at perfect

The sum favours short choices (every token costs probability); the normalized forms undo that when the
choices differ in length for reasons unrelated to the answer. Exact continuation (LAMBADA): greedy decoding
of len(target) tokens must give the target, which is lm-eval's `is_greedy` (every target token the argmax
given those before it). Tokens are lm-eval's (encode_pair); right-padded batches and shared prefixes (a
context run once, its KV cache copied per choice) change no score (tested). notes.md §2-§3 work it through.

Layout: ids are lists of ints; logits (B, T, vocab).   Demo: python 09_eval/score.py
"""

import sys
from importlib import import_module
from itertools import groupby
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
gqa = import_module("05_gqa.gqa")
generate = import_module("06_model.generate")


def choice_logp(logits, row: int, start: int, cont: list) -> tuple:
    """(ll = sum_k log p(cont_k), is_greedy) from logits[row, start : start + m], the positions predicting cont."""
    logp = F.log_softmax(logits[row, start : start + len(cont)].float(), dim=-1)  # (m, V)
    target = torch.tensor(cont, device=logp.device)  # (m,)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


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


def loglikelihoods(model, requests, batch_size: int = 16, share_prefix: bool = True) -> list:
    """[(ll, is_greedy)] for requests [(context ids, continuation ids)], in order; both must be non-empty
    (a context may be just </s>). Consecutive requests with one context share it when they fit."""
    if any(not ctx or not cont for ctx, cont in requests):
        raise ValueError("every request needs a non-empty context and continuation (start contexts with </s>)")
    longest, L = max((len(cont) for _, cont in requests), default=0), model.config.max_seq_len
    if longest > L:  # lm-eval's limit too: the window must hold every scored token
        raise ValueError(f"a continuation of {longest} tokens is longer than the model's window of {L}: "
                         "it cannot be scored (shorten the choices)")
    was_training = model.training
    model.eval()
    try:
        if not share_prefix:
            return _plain(model, list(requests), batch_size)
        out = []
        for ctx, group in groupby(requests, key=lambda r: tuple(r[0])):
            conts = [cont for _, cont in group]
            fits = len(ctx) + max(map(len, conts)) <= L and len(conts) <= model.config.max_batch_size
            out += _shared(model, list(ctx), conts) if fits else _plain(model, [(list(ctx), c) for c in conts], batch_size)
        return out
    finally:
        model.train(was_training)


@torch.no_grad()
def _plain(model, requests, batch_size: int) -> list:
    """One row per request, (context + continuation)[-(L + 1):][:-1] (lm-eval's left truncation), right-padded:
    a causal model never attends to the padding after a token."""
    L, device, out = model.config.max_seq_len, model.tok_embeddings.weight.device, []
    for i in range(0, len(requests), batch_size):
        rows = [(ctx + cont)[-(L + 1):][:-1] for ctx, cont in requests[i : i + batch_size]]
        x = pad_sequence([torch.tensor(r) for r in rows], batch_first=True).to(device)  # (B, T) pad id 0
        logits, _ = model(x)  # (B, T, V)
        for b, (r, (_, cont)) in enumerate(zip(rows, requests[i : i + batch_size])):
            out.append(choice_logp(logits, b, len(r) - len(cont), cont))
    return out


@torch.no_grad()
def _shared(model, ctx: list, conts: list) -> list:
    """The context once (batch 1) into a KV cache (lesson 05), copied to one row per continuation; then every
    continuation at once from position len(ctx)."""
    cfg, w = model.config, model.tok_embeddings.weight
    n, T = len(conts), len(ctx) + max(map(len, conts))
    caches = [gqa.KVCache(n, T, cfg.kv_heads, cfg.head_dim, w.dtype, w.device) for _ in model.layers]
    ctx_logits, _ = model(torch.tensor([ctx], device=w.device), caches=caches)  # (1, Tc, V)
    for c in caches:  # row 0 holds the context's keys and values: every row starts from them
        c.k[:, : len(ctx)], c.v[:, : len(ctx)] = c.k[:1, : len(ctx)], c.v[:1, : len(ctx)]
    x = pad_sequence([torch.tensor(cont) for cont in conts], batch_first=True).to(w.device)  # (n, m_max) pad id 0
    logits, _ = model(x, start_pos=len(ctx), caches=caches)  # (n, m_max, V)
    # The first continuation token is predicted by the context's last position, the rest by the choice's own.
    logits = torch.cat([ctx_logits[:, -1:].expand(n, 1, -1), logits], dim=1)  # (n, m_max + 1, V)
    return [choice_logp(logits, j, 0, cont) for j, cont in enumerate(conts)]


def encode_pair(tokenizer, context: str, continuation: str, prefix: tuple = ()) -> tuple:
    """(context ids, continuation ids) as lm-eval makes them (api/model.py _encode_pair), after `prefix` ids:
    the pair encoded whole and split at the context's length, so no merge across the join is lost."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # "...the " + "question" -> "...the" + " question": GPT-2 tokens carry their leading space
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    ctx = tokenizer.encode(context, add_special_tokens=False).ids
    return [*prefix, *ctx], whole[len(ctx):]


@torch.no_grad()
def greedy_matches(model, prompts: list, targets: list, stop_id: int | None = None) -> list:
    """For each (prompt ids, target ids): does greedy decoding of len(target) tokens (lesson 06's generate, in
    batches of max_batch_size) give exactly the target? Prompts lose tokens on the left to fit."""
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
    requests = [([1, 5, 9, 12], c) for c in ([3], [7, 8], [20, 21, 22])]
    shared, plain = loglikelihoods(model, requests), loglikelihoods(model, requests, batch_size=1, share_prefix=False)
    for (_, c), (a, _), (b, _) in zip(requests, shared, plain):
        print(f"choice {c}: log p = {a:.5f} (context shared, batched) vs {b:.5f} (one at a time)")
    lls = [ll for ll, _ in shared]
    print(f"picked: sum -> {predict(lls, [1, 2, 3], [1, 2, 3])['acc']}; centered accuracy of 0.5 with 4 choices = {centered(0.5, 0.25):.3f}")
    assert all(abs(a - b) < 1e-4 for (a, _), (b, _) in zip(shared, plain)) and argmax(lls) == max(range(3), key=lls.__getitem__)
    print("checked: sharing the context's KV cache and batching give the scores of one pass per choice")
