"""Evaluate a checkpoint in one command: bits per byte on val.bin, and the offline benchmark's three tasks.

    bpb      = sum nats / (ln 2 * sum bytes) over val.bin    (lesson 07's loss_sums; notes.md §1)
    acc      = items whose best-scored choice is the answer / items    (score.py)
    centered = (acc - baseline) / (1 - baseline)    0 at chance, 1 at perfect (CORE)

A base model reads each item as text after "</s>" (the document boundary it saw in pretraining); a chat model
(one carrying a chat template, or --form chat) through lesson 08's template, each choice scored as the
assistant's answer with its closing </s>. Writes eval.json beside the checkpoint (harness.py: the same tasks
through lm-evaluation-harness).

Usage:
    python 09_eval/eval.py --checkpoint out/ckpt_best
    python 09_eval/eval.py --checkpoint out/sft/ckpt_best --form chat
    python 09_eval/eval.py --checkpoint out/ckpt_best --tasks speaker --limit 100
"""

import argparse
import json
import math
import sys
import time
from importlib import import_module
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
tokenizer_lib = import_module("01_tokenizer.tokenizer")
prepare = import_module("01_tokenizer.prepare")
weights = import_module("06_model.weights")
train = import_module("07_pretrain_ddp.train")
template = import_module("08_sft.template")
score = import_module("09_eval.score")
data = import_module("09_eval.data")


def token_file_batches(path, seq_len: int, batch_size: int = 8, max_tokens: int | None = None, device="cpu"):
    """Non-overlapping windows of a uint16 token file (lesson 01's val.bin) as (x, y) batches, each (B, seq_len):
    every token after the first is a target exactly once (up to max_tokens)."""
    tokens = np.memmap(Path(path), dtype=np.uint16, mode="r")
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    starts = list(range(0, n - 1, seq_len))
    for i in range(0, len(starts), batch_size):
        rows = [torch.from_numpy(tokens[s : min(s + seq_len + 1, n)].astype(np.int64)) for s in starts[i : i + batch_size]]
        xy = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=train.IGNORE).to(device)  # (B, <= T + 1)
        yield xy[:, :-1].clamp(min=0), xy[:, 1:]  # the last window may be short: its padding is ignored


def val_bpb(model, tok, tok_path, data_dir, max_tokens: int | None = None) -> float | str:
    """bpb of val.bin in data_dir, or why not: its token files must be this tokenizer's (meta.json's sha256)."""
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        return f"skipped: no token files in {data_dir} (--data_dir)"
    if json.loads(meta_path.read_text()).get("tokenizer_sha256") != tokenizer_lib.tokenizer_sha256(tok_path):
        return f"skipped: the token files in {data_dir} were made by another tokenizer than {tok_path}"
    batches = token_file_batches(Path(data_dir) / "val.bin", model.config.max_seq_len, 8, max_tokens, model.tok_embeddings.weight.device)
    nats, n_bytes, _ = train.loss_sums(model, batches, tokenizer_lib.token_byte_lengths(tok, model.config.vocab_size)).tolist()
    if not n_bytes:
        raise ValueError("the targets spell no bytes (only special tokens): bits per byte is undefined")
    return nats / (math.log(2) * n_bytes)


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
        hits = score.greedy_matches(model, *map(list, zip(*(exact_request(it, tok, fmt) for it in items))))
        return {"exact": sum(hits) / len(items), "predictions": [int(h) for h in hits]}
    reqs, sizes = zip(*(requests_of(it, tok, fmt) for it in items))
    lls = iter(score.loglikelihoods(model, [r for rs in reqs for r in rs], batch_size))  # flat: an item's choices adjacent
    preds = [score.predict([next(lls)[0] for _ in rs], [len(c) for _, c in rs], nbytes) for rs, nbytes in zip(reqs, sizes)]
    accs = {m: sum(p[m] == it["label"] for p, it in zip(preds, items)) / len(items) for m in ("acc", "acc_token", "acc_bytes")}
    return {**accs, "predictions": preds}


def evaluate(model, tok, bench_dir, tasks=None, form: str = "base", limit: int | None = None) -> dict:
    """{task: {items, metric, accuracy, baseline, centered, acc...}} over the benchmark in bench_dir."""
    fmt = template.ChatFormat(tok) if form == "chat" else None
    results = {}
    for name in tasks or list(data.TASKS):
        if name not in data.TASKS:
            raise ValueError(f"unknown task {name!r}: lilLM's are {', '.join(data.TASKS)} (hub tasks: 09_eval/harness.py)")
        spec, items = data.TASKS[name], data.load_task(Path(bench_dir) / f"{name}.jsonl")[:limit]
        r = evaluate_task(model, tok, items, spec["kind"], fmt)
        metric = spec["chat_metric" if fmt else "metric"]
        results[name] = {"items": len(items), "metric": metric, "accuracy": r[metric], "baseline": spec["baseline"],
                         "centered": score.centered(r[metric], spec["baseline"]), **{k: v for k, v in r.items() if k != "predictions"}}
    return results


def table(results: dict, bits: float | str | None) -> str:
    rows = [f"{'task':<12} {'items':>6} {'accuracy':>9} {'centered':>9} {'baseline':>9}  metric"]
    for name, r in results.items():
        rows.append(f"{name:<12} {r['items']:>6} {r['accuracy']:>9.4f} {r['centered']:>9.4f} {r['baseline']:>9.2f}  {r['metric']}")
    core = sum(r["centered"] for r in results.values()) / len(results)  # evaluate gives at least one task
    rows.append(f"{'mean':<12} {'':>6} {'':>9} {core:>9.4f} {'':>9}  centered, CORE-style")
    if bits is not None:
        rows.append(f"val.bin bits per byte: {bits:.4f}" if isinstance(bits, float) else f"val.bin bits per byte: {bits}")
    return "\n".join(rows)


def run_eval(checkpoint, tokenizer=None, bench_dir=data.DEFAULT_DIR, data_dir=prepare.DEFAULT_DATA_DIR, tasks=None,
             form: str = "auto", limit: int | None = None, bpb_tokens: int | None = None, device: str = "cpu") -> dict:
    """Evaluate, print the table, write eval.json beside the checkpoint; return what it holds. Bad input raises
    FileNotFoundError, ValueError or DataError with a one-line message (main prints it as `error: ...`)."""
    start, path = time.perf_counter(), Path(checkpoint)
    model, tok, tok_path = weights.load_pair(path, tokenizer, device)  # any checkpoint kind, its tokenizer checked
    model.eval()
    if not (Path(bench_dir) / "meta.json").is_file():
        data.build(bench_dir)
    form = form if form != "auto" else ("chat" if weights.chat_template(path) is not None else "base")
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
    parser.add_argument("--bench_dir", default=data.DEFAULT_DIR, help="the benchmark's JSONL files (built there if missing)")
    parser.add_argument("--data_dir", default=prepare.DEFAULT_DATA_DIR, help="lesson 01's token files, for bpb on val.bin")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of next_line,speaker,last_word")
    parser.add_argument("--form", default="auto", choices=["auto", "base", "chat"], help="items as text, or through the chat template")
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task (quick looks)")
    parser.add_argument("--bpb_tokens", type=int, default=None, help="at most this many val.bin tokens for bpb (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    with weights.one_line_errors():
        return run_eval(args.checkpoint, args.tokenizer, args.bench_dir, args.data_dir, args.tasks.split(",") if args.tasks else None,
                        args.form, args.limit, args.bpb_tokens, args.device)


if __name__ == "__main__":
    main()
