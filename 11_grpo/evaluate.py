"""How often a policy is right: pass@1 and pass@k from n samples per prompt, and greedy accuracy, with intervals.

    pass@k of one prompt = 1 - C(n - c, k) / C(n, k)       c of its n samples correct, k <= n (Chen et al., 2021,
                                                           arXiv:2107.03374: unbiased, where 1 - (1 - c/n)^k is not)
    pass@k of a task     = the mean over P prompts;  95% interval: mean +- 1.96 sd / sqrt(P), sd over the prompts' values

The interval treats prompts, not samples, as the independent draws: the n samples of one prompt share its
difficulty, and counting them as n independent trials would make the interval up to sqrt(n) too narrow.
Two models measured on the same prompts are compared by the per-prompt differences (a paired interval),
far tighter than two separate intervals when the models agree on which prompts are easy.

Sampling is reproducible by construction: prompts go to generate() in fixed chunks of max_batch_size // n
prompts (n rows each), and chunk j draws from its own generator seeded by (seed, domain, j's first prompt).
So a prompt's samples do not depend on how many processes share the work, and GRPO's validation at step 0
equals this command's figures for the model it starts from.

Commands (figures in BENCHMARKS.md):
    python 11_grpo/evaluate.py --checkpoint out/sft/ckpt_best                     # both forms: pass@1, pass@8, greedy
    python 11_grpo/evaluate.py --checkpoint out/sft_choice/ckpt_best out/grpo/hf --task choice --prompts 936  # paired
"""

import argparse
import math
import sys
from importlib import import_module
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
tokenizer_lib = import_module("01_tokenizer.tokenizer")
generate = import_module("06_model.generate")
template = import_module("08_sft.template")
chat = import_module("08_sft.chat")  # load_chat_model: full checkpoints, LoRA adapters, HF exports
tasks = import_module("11_grpo.tasks")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k samples drawn without replacement from the n (c correct) is correct."""
    assert 0 <= c <= n and 1 <= k <= n, f"need 0 <= c <= n and 1 <= k <= n, got n {n}, c {c}, k {k}"
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def interval(values) -> tuple:
    """(mean, half-width of the normal 95% interval) over per-prompt values."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def chunk_seed(seed: int, domain: int, first: int) -> int:
    """The seed of one generate() call: (run seed, 0 for rollouts / 1 for evaluation, index of its first prompt)."""
    return int(np.random.SeedSequence([seed, domain, first]).generate_state(1)[0])


def answer_text(fmt, ids: list) -> str:
    """A completion as the checker reads it: its text up to the closing </s>. Any other special token stays
    in the text (as "<r1>"), so a completion that opens a new turn is not read as a clean answer."""
    return fmt.tokenizer.decode(ids[:-1] if ids and ids[-1] == fmt.eot_id else ids, skip_special_tokens=False)


def sample(model, prompts: list, n: int, max_new_tokens: int, temperature: float, top_k: int, stop_id: int,
           seed: int, domain: int, first: int = 0, chunks=None) -> list:
    """n completions (token ids, </s> included when produced) for each prompt: [[ids] * n] per prompt.
    first: the index of prompts[0] in its stream (rollouts: the sampler's position). chunks: the chunk
    indices to do (a rank's share); the others' entries stay None."""
    per = max(1, model.config.max_batch_size // n)  # prompts per generate() call
    out = [None] * len(prompts)
    for j, i in enumerate(range(0, len(prompts), per)):
        if chunks is not None and j not in chunks:
            continue
        rows = [p for p in prompts[i : i + per] for _ in range(n)]  # each prompt n times, side by side
        generator = torch.Generator(model.tok_embeddings.weight.device).manual_seed(chunk_seed(seed, domain, first + i))
        new = generate.generate(model, rows, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                stop_id=stop_id, generator=generator)
        for b in range(len(rows) // n):
            out[i + b] = new[b * n : (b + 1) * n]
    return out


def score(model, fmt, items: list, n: int, max_new_tokens: int, temperature: float, top_k: int, seed: int, run=None) -> np.ndarray:
    """(P, 2): per prompt, its correct samples of n (temperature, top-k) and its greedy answer's reward. Under DDP
    the chunks are dealt to the ranks and the table summed, so every rank returns the same one."""
    prompts = [fmt.encode(item["messages"], add_generation_prompt=True)[0] for item in items]
    rank, world = (run.rank, run.world) if run is not None and run.ddp else (0, 1)
    per = max(1, model.config.max_batch_size // n)
    mine = set(range(rank, math.ceil(len(prompts) / per), world))
    samples = sample(model, prompts, n, max_new_tokens, temperature, top_k, fmt.eot_id, seed, 1, chunks=mine)
    table = torch.zeros(len(prompts), 2, dtype=torch.float64)
    ids = [i for i in range(len(prompts)) if samples[i] is not None]  # this rank's prompts
    B = model.config.max_batch_size
    for lo in range(0, len(ids), B):  # greedy answers to the same prompts, B at a time
        batch = ids[lo : lo + B]
        for i, answer in zip(batch, generate.generate(model, [prompts[i] for i in batch], max_new_tokens, stop_id=fmt.eot_id)):
            table[i, 0] = sum(tasks.reward(answer_text(fmt, s), items[i]["answers"]) for s in samples[i])
            table[i, 1] = tasks.reward(answer_text(fmt, answer), items[i]["answers"])
    if world > 1:
        table = table.to(run.device)
        dist.all_reduce(table)
    return table.cpu().numpy()


def summarize(table: np.ndarray, n: int, ks=(1,)) -> dict:
    """{"pass@k": (mean, half-width), ..., "greedy": (mean, half-width)} of a score() table."""
    out = {f"pass@{k}": interval([pass_at_k(n, int(c), k) for c in table[:, 0]]) for k in ks if k <= n}
    return {**out, "greedy": interval(table[:, 1])}


def eval_items(path, count: int) -> list:
    """`count` prompts spread evenly over a task file (all of them if fewer), as a fixed validation set."""
    items = tasks.read_prompts(path)
    keep = np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int)
    return [items[i] for i in keep]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="pass@1, pass@k and greedy accuracy of chat models on a verifiable task.")
    parser.add_argument("--checkpoint", nargs="+", required=True, help="one or two models (what 08_sft/chat.py loads)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: beside the checkpoint, else data/tokenizer.json)")
    parser.add_argument("--task", default="both", choices=[*tasks.FORMS, "both"], help="the speaker task's form(s)")
    parser.add_argument("--data", help="a JSONL task file of your own instead ({\"prompt\", \"answer\"} per line)")
    parser.add_argument("--data_dir", default=tasks.DEFAULT_DIR, help="where the built-in task is written")
    parser.add_argument("--prompts", type=int, default=256, help="validation prompts, spread evenly over the file")
    parser.add_argument("--samples", type=int, default=8, help="n: samples per prompt (pass@k for k = 1 and n)")
    parser.add_argument("--max_new_tokens", type=int, default=16, help="longest answer in tokens")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling (GRPO's validation uses its --seed)")
    args = parser.parse_args(argv)
    with import_module("07_pretrain_ddp.config").one_line_errors():
        if len(args.checkpoint) > 2 or args.samples < 1 or args.prompts < 2:
            raise ValueError("give one or two --checkpoint, --samples >= 1 and --prompts >= 2")
        fmt = template.ChatFormat(tokenizer_lib.load_tokenizer(template.find_tokenizer(args.checkpoint[0], args.tokenizer)))
        models = [chat.load_chat_model(c) for c in args.checkpoint]
        forms = [args.data] if args.data else tasks.FORMS if args.task == "both" else [args.task]
        results = {}
        for form in forms:
            path = form if args.data else tasks.default_data(args.data_dir, form)[1]
            items = eval_items(path, args.prompts)
            tables = [score(m, fmt, items, args.samples, args.max_new_tokens, args.temperature, args.top_k, args.seed) for m in models]
            print(f"{Path(path).name}: {len(items)} prompts, {args.samples} samples each at temperature {args.temperature}")
            for ckpt, table in zip(args.checkpoint, tables):
                figures = summarize(table, args.samples, (1, args.samples))
                results[(form, ckpt)] = figures
                print(f"  {ckpt}: " + ", ".join(f"{k} {m:.3f} +- {h:.3f}" for k, (m, h) in figures.items()))
            if len(tables) == 2:  # the same prompts: per-prompt differences of pass@1 and of greedy
                diff = (tables[1] - tables[0]) / np.array([args.samples, 1])
                (d1, h1), (dg, hg) = interval(diff[:, 0]), interval(diff[:, 1])
                print(f"  second - first (paired): pass@1 {d1:+.3f} +- {h1:.3f}, greedy {dg:+.3f} +- {hg:.3f}")
                results[(form, "difference")] = {"pass@1": (d1, h1), "greedy": (dg, hg)}
        return results


if __name__ == "__main__":
    main()
