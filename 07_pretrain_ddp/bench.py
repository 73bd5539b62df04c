"""Benchmarks of the trainer: its throughput (tokens/s, MFU, 1 process vs 2), and AdamW against Muon.

    MFU = (training FLOPs per token x tokens per second) / (peak FLOP/s of the devices)

Throughput: train.py runs a few steps at the same global batch for 1 and 2 processes (torchrun, Gloo); the figure
is the median over the steps after the first, on the CPU preset (3.2M parameters, windows of 256) and the seed's
39.6M model (windows of 512, a small batch: a 524,288-token step would take an hour here). The peak is
metrics.peak_flops', which train.py uses too.

Optimizers (--compare): the CPU preset's main job (same data, seed, batch, 900 steps) with AdamW and with Muon,
each at several learning rates, evaluated every 50 steps: validation loss at equal steps, the first step at which
each run reaches the final validation loss of AdamW at the preset's rate, wall time per step, lesson 09's table of
the best run of each, and a plot of the curves. Each run is kept in OUT/NAME/ (a rerun skips finished runs).

    python 07_pretrain_ddp/bench.py                           # throughput (~10 minutes on 2 cores)
    python 07_pretrain_ddp/bench.py --compare                 # AdamW vs Muon (~45 minutes on 2 cores)
    python 07_pretrain_ddp/bench.py --compare --adamw_lrs 2e-3 --muon_lrs 4e-3 --steps 300   # a quick look
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ["--data_dir", "data/shakespeare", "--tokenizer", "data/tokenizer.json", "--corpus", "shakespeare"]
CONFIGS = {  # name: (flags, global batch in windows)
    "cpu preset (3.2M, T=256)": (["--preset", "cpu"], 8),
    "seed model (39.6M, T=512)": (["--preset", "full", "--no-compile", "--dtype", "float32",
                                   "--global_batch_tokens", "0", "--grad_accum", "1"], 4),
}


def train(flags: list, out, procs: int = 1) -> list:
    """train.py (through torchrun for procs > 1) with flags into out; its metrics.jsonl records."""
    launcher = [sys.executable] + ([] if procs == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"])
    subprocess.run([*launcher, str(ROOT / "07_pretrain_ddp" / "train.py"), *flags, "--out_dir", str(out)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def throughput(args) -> None:
    print("| configuration | processes | global batch | tokens/s | MFU |\n|---|---|---|---|---|")
    for name, (flags, windows) in CONFIGS.items():
        for procs in map(int, args.procs.split(",")):
            with tempfile.TemporaryDirectory() as out:
                records = train([*flags, *SHAKESPEARE, "--device", "cpu", "--batch_size", str(windows // procs), "--max_steps",
                                 str(args.steps), "--warmup_steps", "1", "--eval_tokens", "1", "--sample_tokens", "0",
                                 "--log_interval", "1"], out, procs)[2:]  # no step 0, 1
            tokens, mfu = (statistics.median(r[k] for r in records) for k in ("tokens_per_s", "mfu"))
            print(f"| {name} | {procs} | {windows} windows | {tokens:,.0f} | {100 * mfu:.1f}% |", flush=True)


def reached(val: list, target: float):
    """The first step whose validation loss is at most target, interpolated between two evaluations; None if never."""
    for (s0, v0), (s1, v1) in zip(val, val[1:]):
        if v1 <= target:
            return s1 if v0 == v1 else s0 + (s1 - s0) * (v0 - target) / (v0 - v1)
    return None


def compare(args) -> None:
    out = Path(args.out)
    runs = [("adamw", float(lr)) for lr in args.adamw_lrs.split(",")] + [("muon", float(lr)) for lr in args.muon_lrs.split(",")]
    results = {}
    for optimizer, lr in runs:
        name, run_dir = f"{optimizer}_lr{lr:g}", out / f"{optimizer}_lr{lr:g}"
        lrs = ["--lr", str(lr), "--min_lr", str(lr / 10)] if optimizer == "adamw" else ["--muon_lr", str(lr)]
        if not (run_dir / "summary.json").is_file():
            print(f"training {name} ...", flush=True)
            train(["--preset", "cpu", "--optimizer", optimizer, *lrs, "--max_steps", str(args.steps), "--eval_interval", "50",
                   "--sample_tokens", "0"], run_dir)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results[name] = {"optimizer": optimizer, "lr": lr, "val": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
                         "seconds_per_step": statistics.median(2048 / r["tokens_per_s"] for r in records[2:] if "tokens_per_s" in r),
                         "dir": str(run_dir)}
    baseline = results.get(f"adamw_lr{args.baseline_lr:g}") or next(r for r in results.values() if r["optimizer"] == "adamw")
    target, base_step = baseline["val"][-1][1], baseline["seconds_per_step"]
    marks = [s for s in (args.steps // 3, 2 * args.steps // 3, args.steps)]
    print(f"\ntarget: AdamW at lr {baseline['lr']:g}'s final validation loss, {target:.4f} at step {args.steps}")
    print(f"| run | val loss at steps {', '.join(map(str, marks))} | first step at the target | time per step |\n|---|---|---|---|")
    for name, r in results.items():
        at = dict(r["val"])
        step = reached(r["val"], target)
        r["reached"] = step
        shown = f"{step:.0f} ({100 * step / args.steps:.0f}%)" if step is not None else "not reached"
        print(f"| {name} | {' / '.join(f'{at[s]:.4f}' for s in marks)} | {shown} | {r['seconds_per_step'] * 1e3:.0f} ms "
              f"({r['seconds_per_step'] / base_step:.2f}x) |", flush=True)
    best = {opt: min((r for r in results.values() if r["optimizer"] == opt), key=lambda r: r["val"][-1][1]) for opt in ("adamw", "muon")}
    for opt, r in best.items():
        print(f"\nlesson 09's table of the best {opt} run ({r['dir']}/ckpt_best):", flush=True)
        subprocess.run([sys.executable, str(ROOT / "09_eval" / "eval.py"), "--checkpoint", f"{r['dir']}/ckpt_best"], cwd=ROOT, check=True)
        r["eval"] = json.loads((Path(r["dir"]) / "ckpt_best" / "eval.json").read_text())["tasks"]
    plot(results, target, out / "adamw_vs_muon.png")
    (out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'adamw_vs_muon.png'} and {out / 'compare.json'}")


def plot(results: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for name, r in results.items():
        ax.plot(*zip(*r["val"][1:]), marker="o", markersize=3, linestyle="-" if r["optimizer"] == "muon" else "--", label=name)
    ax.axhline(target, color="gray", linewidth=0.8, label="AdamW's final")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats per token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run [throughput: 6; --compare: 900]")
    parser.add_argument("--procs", default="1,2", help="throughput: process counts to compare, comma-separated")
    parser.add_argument("--compare", action="store_true", help="AdamW vs Muon on the CPU preset instead of the throughput")
    parser.add_argument("--adamw_lrs", default="1e-3,2e-3,4e-3", help="--compare: AdamW's peak learning rates")
    parser.add_argument("--muon_lrs", default="2e-3,4e-3,8e-3", help="--compare: Muon's peak learning rates (its matrices)")
    parser.add_argument("--baseline_lr", type=float, default=2e-3, help="--compare: the AdamW run whose final loss is the target")
    parser.add_argument("--out", default="out/bench_optimizers", help="--compare: where the runs, the plot and compare.json go")
    args = parser.parse_args()
    args.steps = args.steps or (900 if args.compare else 6)
    compare(args) if args.compare else throughput(args)


if __name__ == "__main__":
    main()
