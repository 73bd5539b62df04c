"""Evaluate a checkpoint: bits per byte on val.bin, and the offline benchmark's three tasks, in one command.

    bpb        = sum nats / (ln 2 * sum bytes) over val.bin (bpb.py)
    acc        = items whose best-scored choice is the answer / items (score.py)
    centered   = (acc - baseline) / (1 - baseline)    0 at chance, 1 at perfect (CORE)

A base model reads each item as text: "</s>" (the document boundary it saw in pretraining, where models
with one get BOS), the window of the scene, then each choice. A chat model (LoRA adapters, or an export
with a chat template; or --form chat) gets the same items through lesson 08's template: the question
as the user's turn, each choice scored as the assistant's answer including its closing </s>.

Prints a table (task, items, accuracy, centered, baseline) and writes eval.json beside the checkpoint
(inside an out/ckpt_*/ directory). 09_eval/harness.py runs the same tasks through lm-evaluation-harness.

Usage:
    python 09_eval/eval.py --checkpoint out/ckpt_best
    python 09_eval/eval.py --checkpoint out/sft/ckpt_best --form chat
    python 09_eval/eval.py --checkpoint out/ckpt_best --tasks speaker --limit 100
"""

import argparse
import json
import sys
import time
from importlib import import_module
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
corpus = import_module("01_tokenizer.corpus")
tokenizer_lib = import_module("01_tokenizer.tokenizer")
prepare = import_module("01_tokenizer.prepare")
template = import_module("08_sft.template")
chat = import_module("08_sft.chat")
lora = import_module("08_sft.lora")
bpb = import_module("09_eval.bpb")
score = import_module("09_eval.score")
benchmark = import_module("09_eval.benchmark")


def requests_of(item: dict, tok, fmt=None) -> tuple:
    """(requests [(context ids, continuation ids)], bytes of each choice) of a multiple-choice item.
    Base form: </s> + the harness's encode_pair. Chat form: the template's prompt, then answer + </s>."""
    if fmt is None:
        reqs = [score.encode_pair(tok, item["context"], c, prefix=(tokenizer_lib.EOT_ID,)) for c in item["choices"]]
        return reqs, [len(c.encode()) for c in item["choices"]]
    prompt, _ = fmt.encode(item["chat"]["messages"], add_generation_prompt=True)
    answers = item["chat"]["choices"]
    return [(prompt, tok.encode(a, add_special_tokens=False).ids + [fmt.eot_id]) for a in answers], [len(a.encode()) for a in answers]


def exact_request(item: dict, tok, fmt=None) -> tuple:
    """(prompt ids, target ids) of a last-word item; in chat form the answer's head is already in the assistant turn."""
    if fmt is None:
        return score.encode_pair(tok, item["context"], item["target"], prefix=(tokenizer_lib.EOT_ID,))
    prompt, _ = fmt.encode(item["chat"]["messages"], add_generation_prompt=True)
    return score.encode_pair(tok, item["chat"]["prefill"], item["chat"]["target"], prefix=tuple(prompt))


def evaluate_task(model, tok, items: list, kind: str, fmt=None, batch_size: int = 16) -> dict:
    """{metric: accuracy} and the per-item predictions of one task."""
    if kind == "exact":
        prompts, targets = zip(*(exact_request(it, tok, fmt) for it in items))
        hits = score.greedy_matches(model, list(prompts), list(targets))
        return {"exact": sum(hits) / len(items), "predictions": [int(h) for h in hits]}
    reqs, sizes = zip(*(requests_of(it, tok, fmt) for it in items))
    lls = score.loglikelihoods(model, [r for rs in reqs for r in rs], batch_size)  # flat: choices of an item adjacent
    out, preds, i = {}, [], 0
    for item, rs, nbytes in zip(items, reqs, sizes):
        picked = score.predict([ll for ll, _ in lls[i : i + len(rs)]], [len(c) for _, c in rs], nbytes)
        preds.append(picked)
        i += len(rs)
    for metric in ("acc", "acc_token", "acc_bytes"):
        out[metric] = sum(p[metric] == it["label"] for p, it in zip(preds, items)) / len(items)
    return {**out, "predictions": preds}


def evaluate(model, tok, data_dir, tasks=None, form: str = "base", limit: int | None = None) -> dict:
    """{task: {items, baseline, metric, accuracy, centered, acc...}} over the benchmark in data_dir."""
    fmt = template.ChatFormat(tok) if form == "chat" else None
    results = {}
    for name in tasks or list(benchmark.TASKS):
        if name not in benchmark.TASKS:
            raise ValueError(f"unknown task {name!r}: lilLM's are {', '.join(benchmark.TASKS)} (hub tasks: 09_eval/harness.py)")
        spec, items = benchmark.TASKS[name], benchmark.load_task(Path(data_dir) / f"{name}.jsonl")[:limit]
        r = evaluate_task(model, tok, items, spec["kind"], fmt)
        metric = spec["chat_metric" if fmt else "metric"]
        acc = r[metric]
        results[name] = {"items": len(items), "metric": metric, "accuracy": acc, "baseline": spec["baseline"],
                         "centered": score.centered(acc, spec["baseline"]), **{k: v for k, v in r.items() if k != "predictions"}}
    return results


def val_bpb(model, tok, tok_path, data_dir, max_tokens: int | None) -> float | str:
    """bpb of val.bin in data_dir, or why not: its token files must be this tokenizer's (meta.json's sha256)."""
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        return f"skipped: no token files in {data_dir} (--data_dir)"
    if json.loads(meta_path.read_text()).get("tokenizer_sha256") != tokenizer_lib.tokenizer_sha256(tok_path):
        return f"skipped: the token files in {data_dir} were made by another tokenizer than {tok_path}"
    device = model.tok_embeddings.weight.device
    batches = bpb.token_file_batches(Path(data_dir) / "val.bin", model.config.max_seq_len, 8, max_tokens, device)
    return bpb.bits_per_byte(model, batches, bpb.token_byte_lengths(tok, model.config.vocab_size))


def table(results: dict, bits: float | str | None) -> str:
    rows = [f"{'task':<12} {'items':>6} {'accuracy':>9} {'centered':>9} {'baseline':>9}  metric"]
    for name, r in results.items():
        rows.append(f"{name:<12} {r['items']:>6} {r['accuracy']:>9.4f} {r['centered']:>9.4f} {r['baseline']:>9.2f}  {r['metric']}")
    if results:
        core = sum(r["centered"] for r in results.values()) / len(results)
        rows.append(f"{'mean':<12} {'':>6} {'':>9} {core:>9.4f} {'':>9}  centered, CORE-style")
    if bits is not None:
        rows.append(f"val.bin bits per byte: {bits:.4f}" if isinstance(bits, float) else f"val.bin bits per byte: {bits}")
    return "\n".join(rows)


def chat_form(path: Path) -> bool:
    """Does this checkpoint look fine-tuned for chat: LoRA adapters, an export carrying a chat template, or a
    checkpoint of an SFT run (its run's config.json names the --base it fine-tuned)?"""
    config, run = path / "tokenizer_config.json", path.parent / "config.json"
    return (path.name == lora.ADAPTER_FILE or (path / lora.ADAPTER_FILE).is_file()
            or (config.is_file() and "chat_template" in json.loads(config.read_text()))
            or (run.is_file() and "base" in json.loads(run.read_text())))


def run_eval(checkpoint, tokenizer=None, bench_dir=benchmark.DEFAULT_DIR, data_dir=prepare.DEFAULT_DATA_DIR, tasks=None,
             form: str = "auto", limit: int | None = None, bpb_tokens: int | None = None, device: str = "cpu") -> dict:
    """Evaluate, print the table, write eval.json beside the checkpoint; return what it holds. Raises
    FileNotFoundError, ValueError or DataError with a one-line message (main turns them into `error: ...`)."""
    start, path = time.perf_counter(), Path(checkpoint)
    model = chat.load_chat_model(path, device=device).eval()
    tok_path = template.find_tokenizer(path, tokenizer)
    tok = tokenizer_lib.load_tokenizer(tok_path)
    if tok.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} tokens, the model {model.config.vocab_size}: "
                         "not the tokenizer this checkpoint was trained with (pass --tokenizer)")
    if not (Path(bench_dir) / "meta.json").is_file():
        benchmark.build(bench_dir)
    form = form if form != "auto" else ("chat" if chat_form(path) else "base")
    results = evaluate(model, tok, bench_dir, tasks, form, limit)
    bits = val_bpb(model, tok, tok_path, data_dir, bpb_tokens) if form == "base" else None
    print(f"{checkpoint} ({model.num_params():,} parameters), {form} form, {time.perf_counter() - start:.1f} s")
    print(table(results, bits))
    report = {"checkpoint": str(path), "form": form, "val_bpb": bits, "tasks": results,
              "benchmark": json.loads((Path(bench_dir) / "meta.json").read_text())}
    out = (path if path.is_dir() else path.parent) / "eval.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a lilLM checkpoint: bpb on val.bin and the offline benchmark.")
    parser.add_argument("--checkpoint", required=True, help="save_model file, out/ckpt_*/ dir, HF export dir, or LoRA adapters")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the checkpoint, else data/tokenizer.json)")
    parser.add_argument("--bench_dir", default=benchmark.DEFAULT_DIR, help="the benchmark's JSONL files (built there if missing)")
    parser.add_argument("--data_dir", default=prepare.DEFAULT_DATA_DIR, help="lesson 01's token files, for bpb on val.bin")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of next_line,speaker,last_word")
    parser.add_argument("--form", default="auto", choices=["auto", "base", "chat"], help="items as text, or through the chat template")
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task (quick looks)")
    parser.add_argument("--bpb_tokens", type=int, default=None, help="at most this many val.bin tokens for bpb (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    try:
        return run_eval(args.checkpoint, args.tokenizer, args.bench_dir, args.data_dir, args.tasks.split(",") if args.tasks else None,
                        args.form, args.limit, args.bpb_tokens, args.device)
    except (FileNotFoundError, ValueError, corpus.DataError) as e:
        print(f"error: {e}", file=sys.stderr)  # one line and exit code 2, as lessons 01, 07 and 08 do
        sys.exit(2)


if __name__ == "__main__":
    main()
