"""The pipeline's report card: OUT/report.md and OUT/report.json, every figure read from the files the stages wrote.

    python report.py --out_dir out/pipeline     # rewrite it from what is there (pipeline.py writes it at the end)
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MEANS = {  # one line per stage: what its numbers mean
    "data": "Tokens the model trains and validates on; validation documents are whole scenes held out by a hash of their text.",
    "pretrain": "Cross-entropy per token on held-out text, and the same in bits per byte (comparable across tokenizers); "
                "a uniform guess over the vocabulary is ln V nats.",
    "eval": "Share of the benchmark's items the model gets right (chance: baseline), with 95% binomial intervals; centered puts "
            "chance at 0 and perfect at 1.",
    "sft": "Assistant-token loss on held-out conversations, and how often a greedy answer ends its turn with </s>: a chat model "
           "answers and stops, a base model rambles on.",
    "dpo": "On held-out pairs: how often the implicit reward prefers the better answer, by how much, and how far (KL, nats per "
           "answer) the policy moved from the SFT model.",
    "grpo": "pass@1: the chance that one sampled answer is right, before and after GRPO on the same held-out prompts; the paired "
            "difference's interval says whether the gain is outside the noise.",
    "gguf": "One file llama.cpp and ollama load as is: its size and the metadata they read.",
    "serve": "One streamed answer from the OpenAI-compatible server through the official openai client: time to the first "
             "piece of text, and tokens per second of the answer.",
}


def read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def interval(p: float, n: int) -> float:
    return 1.96 * math.sqrt(p * (1 - p) / n) if n else float("nan")


def figures(stage: str, out: Path) -> dict:
    """The stage's figures, read from its files; {} when it has not run."""
    if stage == "data":
        meta = read(out / "data" / "tokens" / "meta.json") or {}
        return {k: meta[k] for k in ("vocab_size", "train_tokens", "val_tokens", "train_docs", "val_docs", "corpus") if k in meta}
    if stage == "pretrain":
        records = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()] \
            if (out / "pretrain" / "metrics.jsonl").is_file() else []
        val = [r for r in records if "val_loss" in r]
        if not val:
            return {}
        config = read(out / "pretrain" / "config.json") or {}
        return {"steps": val[-1]["step"], "val_loss_start": val[0]["val_loss"], "val_loss": val[-1]["val_loss"],
                "val_bpb": val[-1].get("val_bpb"), "best_val_loss": min(r["val_loss"] for r in val),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records if "tokens_per_s" in r),
                "model": config.get("model"), "plot": "pretrain/loss.png"}
    if stage == "eval":
        return eval_table(out / "pretrain" / "ckpt_best" / "eval.json")
    if stage in ("sft", "dpo"):
        summary = read(out / stage / "summary.json") or {}
        if not summary.get("finished"):
            return {}
        before, after = summary["before"], summary["after"]
        if stage == "sft":
            got = {"val_loss": [before["val_loss"], after["val_loss"]], "eot_rate": [before["eot_rate"], after["eot_rate"]]}
        else:
            records = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
            got = {"val_loss": [records[0]["val_loss"], after["loss"]], "reward_accuracy": [0.0, after["rewards/accuracies"]],
                   "margin": [0.0, after["rewards/margins"]], "kl": after["kl"],
                   "logps_chosen": [before["logps/chosen"], after["logps/chosen"]]}
        return {**got, "chat_eval": eval_table(out / stage / "ckpt_best" / "eval.json"), "plot": f"{stage}/loss.png"}
    if stage == "grpo":
        summary, paired = read(out / "grpo" / "summary.json") or {}, read(out / "grpo" / "pass_at_k.json")
        if not summary.get("finished") or paired is None:
            return {}
        (_, warm), (_, trained), (_, difference) = paired["choice"].items()  # the warm-up's model, GRPO's, the difference
        return {"pass@1": [warm["pass@1"], trained["pass@1"]], "difference": difference["pass@1"],
                "greedy": [warm["greedy"], trained["greedy"]], "validation": summary["difference"], "plot": "grpo/grpo.png"}
    if stage == "gguf":
        path = out / "gguf" / "lillm-q8_0.gguf"
        if not path.is_file():
            return {}
        import gguf

        reader = gguf.GGUFReader(str(path))
        keys = ("general.architecture", "llama.context_length", "llama.embedding_length", "llama.block_count",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.vocab_size", "tokenizer.ggml.model",
                "tokenizer.ggml.pre")
        meta = {k: field_value(reader.fields[k]) for k in keys if k in reader.fields}
        return {"file": "gguf/lillm-q8_0.gguf", "megabytes": round(path.stat().st_size / 1e6, 2), "metadata": meta,
                "chat_template": "tokenizer.chat_template" in reader.fields, "tensors": len(reader.tensors)}
    if stage == "serve":
        return read(out / "serve" / "smoke.json") or {}
    raise ValueError(stage)


def field_value(field):
    """A GGUF metadata field as a plain value."""
    value = field.contents()
    return value.item() if hasattr(value, "item") else value


def eval_table(path: Path) -> dict:
    """Lesson 09's eval.json as {task: [accuracy, half-width of the 95% interval, baseline, items]}, and bpb."""
    report = read(path)
    if report is None:
        return {}
    tasks = {name: [t["accuracy"], interval(t["accuracy"], t["items"]), t["baseline"], t["items"]] for name, t in report["tasks"].items()}
    return {"form": report["form"], "val_bpb": report["val_bpb"], "tasks": tasks}


def headline(stage: str, out: Path) -> str:
    """One line of a stage's figures, for the pipeline's progress line."""
    f = figures(stage, out)
    if not f:
        return "(no figures)"
    arrow = lambda pair, fmt=".3f": f"{pair[0]:{fmt}} -> {pair[1]:{fmt}}"  # noqa: E731
    tasks = lambda t: ", ".join(f"{k} {v[0]:.3f}" for k, v in t.get("tasks", {}).items())  # noqa: E731
    return {
        "data": lambda: f"{f['train_tokens']:,} train / {f['val_tokens']:,} val tokens, vocab {f['vocab_size']:,}",
        "pretrain": lambda: f"val loss {f['val_loss_start']:.4f} -> {f['val_loss']:.4f} ({f['val_bpb']:.4f} bits per byte) in {f['steps']} steps",
        "eval": lambda: f"{tasks(f)}; val bpb {f['val_bpb']:.4f}",
        "sft": lambda: f"val loss {arrow(f['val_loss'], '.4f')}, answers ending their turn {arrow(f['eot_rate'], '.2f')}",
        "dpo": lambda: f"reward accuracy {arrow(f['reward_accuracy'])}, margin {f['margin'][1]:.3f}, KL {f['kl']:.2f}",
        "grpo": lambda: f"pass@1 {f['pass@1'][0][0]:.3f} -> {f['pass@1'][1][0]:.3f} (paired {f['difference'][0]:+.3f} +- {f['difference'][1]:.3f})",
        "gguf": lambda: f"{f['megabytes']} MB q8_0, {f['metadata'].get('general.architecture')}, chat template {'in' if f['chat_template'] else 'absent'}",
        "serve": lambda: f"{f['completion_tokens']} tokens streamed, first after {f['ttft_s'] * 1e3:.0f} ms, {f['tokens_per_s']:.0f} tokens/s",
    }[stage]()


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "gpus": gpus, "python": platform.python_version()}


def commit() -> str:
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write(out: Path, record: dict, steps: dict | None = None) -> Path:
    """report.json and report.md under out; returns report.md's path."""
    stages = {}
    for stage in MEANS:
        f = figures(stage, out)
        if f:
            done = record["steps"].get(stage, {})
            stages[stage] = {"figures": f, "seconds": done.get("seconds"), "commands": done.get("commands", []), "means": MEANS[stage]}
    card = {"preset": record["preset"], "commit": commit(), "machine": machine(), "stages": stages}
    (out / "report.json").write_text(json.dumps(card, indent=2) + "\n")
    m = card["machine"]
    lines = [f"# lilLM report card ({record['preset']} preset)", "",
             f"Commit `{card['commit']}`; {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads); "
             f"GPUs: {', '.join(m['gpus']) or 'none'}; torch {m['torch']}, Python {m['python']}.", "",
             "| stage | wall time | headline |", "|---|---|---|"]
    for stage, s in stages.items():
        wall = f"{round(s['seconds']) // 60} min {round(s['seconds']) % 60:02d} s" if s["seconds"] else "(not timed here)"
        lines.append(f"| {stage} | {wall} | {headline(stage, out)} |")
    for stage, s in stages.items():
        lines += ["", f"## {stage}", "", s["means"], ""]
        lines += [f"    {' '.join(c)}" for c in s["commands"]]
        f = s["figures"]
        for table in [f] + ([f["chat_eval"]] if "chat_eval" in f else []):
            if "tasks" in table:
                lines += ["", f"| task ({table['form']} form) | items | accuracy | 95% interval | chance |", "|---|---|---|---|---|"]
                lines += [f"| {k} | {v[3]} | {v[0]:.3f} | ±{v[1]:.3f} | {v[2]:.2f} |" for k, v in table["tasks"].items()]
                if table.get("val_bpb") is not None:
                    lines.append(f"| val.bin bits per byte | | {table['val_bpb']:.4f} | | |")
        rest = {k: v for k, v in f.items() if k not in ("tasks", "chat_eval", "plot", "form")}
        if rest:
            lines += ["", "```json", json.dumps(rest, indent=1), "```"]
        if "plot" in f and (out / f["plot"]).is_file():
            lines += ["", f"![{stage}]({f['plot']})"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write OUT/report.md and report.json from the stages' files.")
    parser.add_argument("--out_dir", default="out/pipeline", help="the pipeline's output directory")
    args = parser.parse_args()
    record = read(Path(args.out_dir) / "pipeline.json")
    if record is None:
        sys.exit(f"error: no pipeline run in {args.out_dir} (pipeline.json is missing): run python pipeline.py first")
    print(write(Path(args.out_dir), record))
