"""Generation: sample a LilLM one token at a time, reusing past keys and values from lesson 05's KV cache.

    prefill:  logits = model(prompt)                   every prompt position at once; the cache fills up
    decode:   x_{t+1} ~ sample(model(x_t, start_pos=t)) one new position per step, attending to the cache
    sample:   greedy (temperature 0), or softmax(logits / temperature) cut to the top-k, then to the top-p

stream_text holds back a token that ends halfway through a UTF-8 character (notes.md, Streaming).
Left out on purpose: beam search, repetition penalties, dropping finished rows.

    python 06_model/generate.py --checkpoint out/ckpt_best --prompt "Once upon a time"
    python 06_model/generate.py --checkpoint out/ckpt_best --prompt "..." --int8 --compile  # fastest on a CPU
"""

import argparse
import sys
import weakref
from importlib import import_module
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
gqa = import_module("05_gqa.gqa")
weights = import_module("06_model.weights")

_compiled = weakref.WeakKeyDictionary()  # model -> its compiled one-token step, built on first use


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


@torch.inference_mode()
def generate_stream(model, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, stop_id: int | None = 2, generator: torch.Generator | None = None,
                    compile: bool = False):
    """Yield, at each decoding step, one entry per prompt: the row's new token id, or None where the row is
    still reading its prompt or has stopped (it produced `stop_id`, or max_new_tokens, or reached max_seq_len).

    prompts: token-id lists whose lengths may differ. Ragged batches as in Meta's llama: prefill every row up to
    the shortest prompt, then step the whole batch one position at a time, so one start_pos serves all rows.
    compile: run the one-token steps through torch.compile (compiled once per model, for every position).
    """
    cfg, weight = model.config, model.tok_embeddings.weight
    B, lengths = len(prompts), [len(p) for p in prompts]
    if not 0 < B <= cfg.max_batch_size or min(lengths) == 0:
        raise ValueError(f"need 1..{cfg.max_batch_size} non-empty prompts, got {B} with lengths {lengths}")
    if max(lengths) > cfg.max_seq_len:
        raise ValueError(f"a prompt of {max(lengths)} tokens is longer than max_seq_len {cfg.max_seq_len}")
    low, high = min(min(p) for p in prompts), max(max(p) for p in prompts)  # on the host, before any tensor
    if low < 0 or high >= cfg.vocab_size:
        raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got [{low}, {high}] (a tokenizer with a larger vocab than the model?)")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    total = min(cfg.max_seq_len, max(lengths) + max_new_tokens)  # no position past max_seq_len, ever
    tokens = torch.zeros(B, total, dtype=torch.long, device=weight.device)  # (B, total) prompts, then samples
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    length = torch.tensor(lengths, device=weight.device)  # (B,)
    # One cache per layer, sized to this call's batch and length, in the model's dtype.
    caches = [gqa.KVCache(B, total, cfg.kv_heads, cfg.head_dim, weight.dtype, weight.device) for _ in model.layers]
    done = torch.zeros(B, dtype=torch.bool, device=weight.device)
    if compile and model not in _compiled:
        # dynamic=True: one graph for every position and cache length, instead of one per position.
        _compiled[model] = torch.compile(model, dynamic=True)
    was_training, prev = model.training, 0
    model.eval()  # no dropout while sampling; restored when the generator finishes or is closed
    try:
        for cur in range(min(lengths), total if max_new_tokens > 0 else 0):
            step = _compiled[model] if compile and cur - prev == 1 else model  # the prefill runs eagerly
            logits, _ = step(tokens[:, prev:cur], start_pos=prev, caches=caches)  # (B, cur - prev, vocab)
            in_prompt = length > cur  # a row still in its prompt takes its prompt token, not the sample
            nxt = torch.where(in_prompt, tokens[:, cur], sample_next(logits[:, -1], temperature, top_k, top_p, generator))
            tokens[:, cur] = nxt
            new = ~in_prompt & ~done
            yield [t if n else None for t, n in zip(nxt.tolist(), new.tolist())]
            done |= (new & (nxt == stop_id)) | (cur + 1 - length >= max_new_tokens)
            if done.all():
                return
            prev = cur
    finally:
        model.train(was_training)


def generate(model, prompts, max_new_tokens: int, **sampling) -> list[list[int]]:
    """The new tokens of each row (the stop token included when it was produced); arguments as generate_stream."""
    out = [[] for _ in prompts]
    for step in generate_stream(model, prompts, max_new_tokens, **sampling):
        for row, t in zip(out, step):
            if t is not None:
                row.append(t)
    return out


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int, **sampling):
    """Yield pieces of text as they become printable; the concatenation is the decoded continuation."""
    ids, shown = [], ""
    for step in generate_stream(model, [tokenizer.encode(prompt).ids], max_new_tokens, **sampling):
        if step[0] is None:
            continue
        ids.append(step[0])
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # an unfinished UTF-8 character: wait for its next byte
            yield text[len(shown):]
            shown = text


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate text from a lilLM checkpoint (streams to stdout).")
    parser.add_argument("--checkpoint", help="save_model file, out/ckpt_*/ directory or Hugging Face export directory")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--tokenizer", help="lesson 01's tokenizer.json (default: beside the checkpoint, else data/tokenizer.json)")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top_p", type=float, default=0.95, help="nucleus: smallest set with this probability")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step")
    parser.add_argument("--int8", action="store_true",
                        help="int8 weight-only matrices (06_model/int8.py): a quarter of the bytes per token")
    args = parser.parse_args(argv)
    int8 = import_module("06_model.int8")  # here, not at the top: int8.py imports this file
    with weights.one_line_errors():
        if not args.checkpoint:
            raise FileNotFoundError(f"no checkpoint given: {weights.HOW_TO_GET_ONE}")
        model, tokenizer, _ = weights.load_pair(args.checkpoint, args.tokenizer, args.device)
        if args.int8:
            int8.quantize_int8(model)
        if not tokenizer.encode(args.prompt).ids:
            raise ValueError("the prompt is empty: pass --prompt TEXT")
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        print(args.prompt, end="", flush=True)
        for piece in stream_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k or None, top_p=args.top_p, generator=generator, compile=args.compile):
            print(piece, end="", flush=True)
        print()


if __name__ == "__main__":
    main()
