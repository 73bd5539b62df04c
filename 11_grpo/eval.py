"""How often a policy is right: pass@1 and pass@k from n samples per prompt, and greedy accuracy, with intervals.

    pass@k of one prompt = 1 - C(n - c, k) / C(n, k)       c of its n samples correct, k <= n (Chen et al., 2021,
                                                           arXiv:2107.03374: unbiased, where 1 - (1 - c/n)^k is not)
    pass@k of a task     = the mean over P prompts;  95% interval: mean +- 1.96 sd / sqrt(P), sd over the prompts' values

Prompts, not samples, are the independent draws; two models are compared by per-prompt differences (paired).
Sampling is seeded per chunk of prompts, whatever the number of processes (notes.md §6). Also here: GRPO's closing
report and its log (metrics.jsonl with each rollout's figures, grpo.png).

Commands (figures in BENCHMARKS.md):
    python 11_grpo/eval.py --checkpoint out/sft/ckpt_best                     # both forms: pass@1, pass@8, greedy
    python 11_grpo/eval.py --checkpoint out/sft_choice/ckpt_best out/grpo/hf --task choice --prompts 936  # paired
"""

import argparse
import json
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
generate = import_module("06_model.generate")
weights = import_module("06_model.weights")
metrics = import_module("07_pretrain_ddp.metrics")
template = import_module("08_sft.template")
data = import_module("11_grpo.data")
SAMPLING = {"max_new_tokens": 16, "temperature": 1.0, "top_k": 0, "eval_prompts": 256, "eval_samples": 8, "seed": 1337}  # GRPO's too


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k samples drawn without replacement from the n (c correct) is correct."""
    assert 0 <= c <= n and 1 <= k <= n, f"need 0 <= c <= n and 1 <= k <= n, got n {n}, c {c}, k {k}"
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def interval(values) -> tuple:
    """(mean, half-width of the normal 95% interval) over per-prompt values."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def answer_text(fmt, ids: list) -> str:
    """A completion as the checker reads it: its text up to the closing </s>. Any other special token stays in the
    text (as "<r1>"), so a completion that opens a new turn is not read as a clean answer."""
    return fmt.tokenizer.decode(ids[:-1] if ids and ids[-1] == fmt.eot_id else ids, skip_special_tokens=False)


def sample(model, prompts: list, n: int, max_new_tokens: int, temperature: float, top_k: int, stop_id: int,
           seed: int, domain: int, first: int = 0, chunks=None) -> list:
    """[[ids] * n] per prompt: n completions, </s> included when produced. domain: 0 for rollouts, 1 for evaluation;
    first: the stream index of prompts[0]; chunks: the chunk indices to do (a rank's share), the others stay None."""
    per = max(1, model.config.max_batch_size // n)  # prompts per generate() call
    out = [None] * len(prompts)
    for j, i in enumerate(range(0, len(prompts), per)):
        if chunks is not None and j not in chunks:
            continue
        rows = [p for p in prompts[i : i + per] for _ in range(n)]  # each prompt n times, side by side
        seed_j = int(np.random.SeedSequence([seed, domain, first + i]).generate_state(1)[0])
        generator = torch.Generator(model.tok_embeddings.weight.device).manual_seed(seed_j)
        new = generate.generate(model, rows, max_new_tokens, temperature=temperature, top_k=top_k or None,
                                stop_id=stop_id, generator=generator)
        out[i : i + per] = [new[b : b + n] for b in range(0, len(new), n)]  # each prompt's n completions
    return out


def score(model, fmt, items: list, n: int, max_new_tokens: int, temperature: float, top_k: int, seed: int, run=None) -> np.ndarray:
    """(P, 2): per prompt, its correct samples of n and its greedy answer's reward. Under DDP the ranks share the
    chunks and sum the table, so every rank returns the same one."""
    prompts = [fmt.encode(item["messages"], add_generation_prompt=True)[0] for item in items]
    rank, world = (run.rank, run.world) if run is not None and run.ddp else (0, 1)
    per, B = max(1, model.config.max_batch_size // n), model.config.max_batch_size
    samples = sample(model, prompts, n, max_new_tokens, temperature, top_k, fmt.eot_id, seed, 1,
                     chunks=set(range(rank, math.ceil(len(prompts) / per), world)))
    table = torch.zeros(len(prompts), 2, dtype=torch.float64)
    ids = [i for i in range(len(prompts)) if samples[i] is not None]  # this rank's prompts
    for lo in range(0, len(ids), B):  # greedy answers to the same prompts, B at a time
        batch = ids[lo : lo + B]
        for i, answer in zip(batch, generate.generate(model, [prompts[i] for i in batch], max_new_tokens, stop_id=fmt.eot_id)):
            table[i, 0] = sum(data.reward(answer_text(fmt, s), items[i]["answers"]) for s in samples[i])
            table[i, 1] = data.reward(answer_text(fmt, answer), items[i]["answers"])
    if world > 1:
        table = table.to(run.device)
        dist.all_reduce(table)
    return table.cpu().numpy()


def summarize(table: np.ndarray, n: int, ks=(1,)) -> dict:
    """{"pass@k": (mean, half-width), ..., "greedy": (mean, half-width)} of a score() table."""
    out = {f"pass@{k}": interval([pass_at_k(n, int(c), k) for c in table[:, 0]]) for k in ks if k <= n}
    return {**out, "greedy": interval(table[:, 1])}


def paired(before: np.ndarray, after: np.ndarray, n: int) -> dict:
    """{"pass@1", "pass@n", "greedy": (mean, half-width)} of the per-prompt differences after - before."""
    per_prompt = lambda t, k: np.array([pass_at_k(n, int(c), k) for c in t[:, 0]]) if k else t[:, 1]
    return {name: interval(per_prompt(after, k) - per_prompt(before, k)) for name, k in (("pass@1", 1), (f"pass@{n}", n), ("greedy", 0))}


def report(before: np.ndarray, after: np.ndarray, n: int, where: str, temperature: float) -> dict:
    """Print and return pass@1, pass@n and greedy accuracy before and after GRPO, with the paired differences."""
    summary = {"before": summarize(before, n, (1, n)), "after": summarize(after, n, (1, n)), "difference": paired(before, after, n)}
    print(f"validation: {len(after)} prompts of {where}, {n} samples each at temperature {temperature} (95% intervals)")
    for name, (d, hd) in summary["difference"].items():
        (b, hb), (a, ha) = summary["before"][name], summary["after"][name]
        print(f"  {name:<8} base {b:.3f} +- {hb:.3f} -> trained {a:.3f} +- {ha:.3f}   paired difference {d:+.3f} +- {hd:.3f}")
    return summary


class RolloutMetrics(metrics.Metrics):
    """Lesson 07's metrics.jsonl, each step's record joined with the figures of the rollout it trained on: reward,
    zero_signal (share of groups with one reward for all), completion_len (tokens, </s> included); and grpo.png."""

    def __init__(self, path: Path, start_step: int, master: bool):
        super().__init__(path, start_step, master)
        self.rollouts = {}  # step -> {"reward", "zero_signal", "completion_len"}, filled by grpo.rollouts

    def write(self, record: dict) -> None:
        super().write({**record, **self.rollouts.pop(record["step"], {})})

    def progress(self, record: dict, max_steps: int) -> None:
        if self.master:
            r = {**record, **self.rollouts.get(record["step"], {})}
            print(f"step {r['step']}/{max_steps} | reward {r['reward']:.3f} | zero-signal groups {100 * r['zero_signal']:.0f}% | "
                  f"length {r['completion_len']:.1f} | clipped {100 * r['clip_frac']:.1f}% | kl {r['kl']:.4f} | "
                  f"loss {r['loss']:+.4f} | lr {r['lr']:.2e} | {r['tokens_per_s']:,.0f} tok/s")

    def plot(self, path: Path, what: str = "loss") -> None:
        if not self.master:
            return
        path, plt = Path(path).with_name("grpo.png"), metrics.plt
        steps, val = [r for r in self.records if "reward" in r], [r for r in self.records if "val_pass@1" in r]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), dpi=100, sharex=True)
        top.plot([r["step"] for r in steps], [r["reward"] for r in steps], alpha=0.6, label="mean reward (train rollouts)")
        top.plot([r["step"] for r in val], [r["val_pass@1"] for r in val], color="tab:red", marker="o", label="validation pass@1")
        bottom.plot([r["step"] for r in steps], [r["completion_len"] for r in steps], color="tab:green")
        top.set(ylabel="reward / pass@1")
        bottom.set(ylabel="completion length (tokens)", xlabel="optimizer step")
        top.legend()
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        print(f"wrote {path}: reward and validation pass@1, completion length, against optimizer steps")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="pass@1, pass@k and greedy accuracy of chat models on a verifiable task.")
    parser.add_argument("--checkpoint", nargs="+", required=True, help="one or two models (any checkpoint lesson 06 loads)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: beside the checkpoint, else data/tokenizer.json)")
    parser.add_argument("--task", default="both", choices=[*data.FORMS, "both"], help="the speaker task's form(s)")
    parser.add_argument("--data", help="a JSONL task file of your own instead ({\"prompt\", \"answer\"} per line)")
    parser.add_argument("--data_dir", default=data.DEFAULT_DIR, help="where the built-in task is written")
    parser.add_argument("--prompts", type=int, default=SAMPLING["eval_prompts"], help="validation prompts, spread evenly over the file")
    parser.add_argument("--samples", type=int, default=SAMPLING["eval_samples"], help="n: samples per prompt (pass@k for k = 1 and n)")
    parser.add_argument("--max_new_tokens", type=int, default=SAMPLING["max_new_tokens"], help="longest answer in tokens")
    parser.add_argument("--temperature", type=float, default=SAMPLING["temperature"], help="sampling temperature")
    parser.add_argument("--top_k", type=int, default=SAMPLING["top_k"], help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=SAMPLING["seed"], help="seed of the sampling (GRPO's validation uses its --seed)")
    parser.add_argument("--json", help="also write the figures to this file ({form: {checkpoint or difference: {figure: [mean, half-width]}}})")
    args = parser.parse_args(argv)
    n, results = args.samples, {}
    with weights.one_line_errors():
        if len(args.checkpoint) > 2 or n < 1 or args.prompts < 2:
            raise ValueError("give one or two --checkpoint, --samples >= 1 and --prompts >= 2")
        models, tokenizer = [], args.tokenizer
        for ckpt in args.checkpoint:  # the second is checked against the first one's tokenizer
            model, tok, tokenizer = weights.load_pair(ckpt, tokenizer)
            models.append(model.eval())
        fmt = template.ChatFormat(tok)
        for form in [args.data] if args.data else data.FORMS if args.task == "both" else [args.task]:
            path = form if args.data else data.task_files(args.data_dir, form)[1]
            items = data.spread(data.read_prompts(path), args.prompts)
            tables = [score(m, fmt, items, n, args.max_new_tokens, args.temperature, args.top_k, args.seed) for m in models]
            print(f"{path}: {len(items)} prompts, {n} samples each at temperature {args.temperature}")
            for ckpt, table in zip(args.checkpoint, tables):
                results[(form, ckpt)] = summarize(table, n, (1, n))
                print(f"  {ckpt}: " + ", ".join(f"{k} {m:.3f} +- {h:.3f}" for k, (m, h) in results[(form, ckpt)].items()))
            if len(tables) == 2:  # the same prompts: per-prompt differences
                results[(form, "difference")] = diff = paired(*tables, n)
                print("  second - first (paired): " + ", ".join(f"{k} {d:+.3f} +- {h:.3f}" for k, (d, h) in diff.items()))
        if args.json:
            nested = {}
            for (form, who), figures in results.items():
                nested.setdefault(str(form), {})[who] = figures
            Path(args.json).write_text(json.dumps(nested, indent=2) + "\n")
        return results


if __name__ == "__main__":
    main()
