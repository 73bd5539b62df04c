"""lm-evaluation-harness on a lilLM: lesson 06's Hugging Face export, the harness's own `hf` model, our task YAMLs.

    checkpoint --06_model/hf.py export_hf--> out dir (LlamaForCausalLM + tokenizer) --lm_eval, model="hf"--> results

The field's reference implementation scores the offline benchmark (tasks/*.yaml: local JSONL files) as eval.py
does, and the test suite checks that both pick the same choice on every item (notes.md §7: its acc_norm is
eval.py's acc_bytes on ASCII text). Hub tasks run through the same command, and fail in one line without the hub.

Usage:
    python 09_eval/harness.py --checkpoint out/ckpt_best                    # lillm_next_line, lillm_speaker, lillm_last_word
    python 09_eval/harness.py --checkpoint out/ckpt_best --tasks hellaswag,arc_easy --limit 200   # needs the hub
"""

import argparse
import json
import os
import sys
import tempfile
from importlib import import_module
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
weights = import_module("06_model.weights")
hf = import_module("06_model.hf")
data = import_module("09_eval.data")

TASK_DIR = Path(__file__).resolve().parent / "tasks"
OURS = [f"lillm_{name}" for name in data.TASKS]


def export(checkpoint, tokenizer, out_dir) -> Path:
    """An export directory the harness loads: the checkpoint itself if it is one, else a fresh export_hf of any
    checkpoint kind with its checked tokenizer (the export pads with </s>, inside the vocabulary)."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "config.json").is_file() and (checkpoint / "tokenizer.json").is_file():
        return checkpoint
    model, _, tokenizer_path = weights.load_pair(checkpoint, tokenizer)
    return hf.export_hf(model, tokenizer_path, out_dir)


def run(hf_dir, tasks=None, bench_dir=data.DEFAULT_DIR, limit=None, device="cpu", batch_size=16) -> dict:
    """lm_eval.simple_evaluate with model="hf" on an export directory; returns its results dict (with samples)."""
    tasks = tasks or OURS
    hub = [t for t in tasks if t not in OURS]
    # Our tasks read local files only: never wait on the network (the libraries read these when first imported).
    offline = [] if hub else [k for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if k not in os.environ]
    os.environ.update({k: "1" for k in offline})
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        with tempfile.TemporaryDirectory() as tmp:
            for yaml in TASK_DIR.glob("*.yaml"):  # our YAMLs, their data_files pointing at bench_dir's JSONL
                name = yaml.stem.removeprefix("lillm_")
                path = (Path(bench_dir) / f"{name}.jsonl").resolve()
                data.load_task(path)  # a missing or empty file: our one-line error, not the harness's traceback
                (Path(tmp) / yaml.name).write_text(yaml.read_text().replace(f"data/eval/{name}.jsonl", str(path)))
            manager = TaskManager(include_path=tmp)
            if unknown := [t for t in tasks if t not in manager.all_tasks]:
                raise ValueError(f"unknown harness task(s) {', '.join(unknown)}; ours are {', '.join(OURS)}")
            try:
                return lm_eval.simple_evaluate(
                    model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32"}, tasks=list(tasks),
                    task_manager=manager, device=device, batch_size=batch_size, limit=limit, log_samples=True,
                    bootstrap_iters=0)  # no bootstrap standard errors: seconds instead of minutes
            except Exception as e:  # the hub's errors come from deep inside datasets/huggingface_hub
                if not hub:
                    raise
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
                raise ValueError(f"harness tasks {', '.join(hub)} need the Hugging Face hub, which failed: {type(e).__name__}: {reason}") from None
    finally:
        for k in offline:
            os.environ.pop(k, None)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run lm-evaluation-harness (model=hf) on a lilLM checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="save_model file, out/ckpt_*/ dir, HF export dir, or LoRA adapters")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the checkpoint, else data/tokenizer.json)")
    parser.add_argument("--tasks", default=",".join(OURS), help="comma-separated harness tasks (hub tasks need the hub)")
    parser.add_argument("--bench_dir", default=data.DEFAULT_DIR, help="the benchmark's JSONL files (built there if missing)")
    parser.add_argument("--hf_dir", default=None, help="where to export (default: a temporary directory)")
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch_size", type=int, default=16, help="the harness's batch size")
    args = parser.parse_args(argv)
    path = Path(args.checkpoint)
    with weights.one_line_errors(), tempfile.TemporaryDirectory() as tmp:
        hf_dir = export(path, args.tokenizer, args.hf_dir or Path(tmp) / "hf")
        if not (Path(args.bench_dir) / "meta.json").is_file():
            data.build(args.bench_dir)
        results = run(hf_dir, args.tasks.split(","), args.bench_dir, args.limit, args.device, args.batch_size)
    from lm_eval.utils import make_table

    print(make_table(results))
    out = (path if path.is_dir() else path.parent) / "harness.json"
    out.write_text(json.dumps({"checkpoint": str(path), "results": results["results"]}, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
