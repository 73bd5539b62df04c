"""Throughput of the trainer itself: tokens/s and MFU, 1 process vs 2 (torchrun, Gloo), on this machine.

    MFU = (training FLOPs per token x tokens per second) / (peak FLOP/s of the devices)

Each configuration runs train.py for a few steps at the same global batch for 1 and for 2 processes
and reads its metrics.jsonl; the figure is the median over the steps after the first (which pays
for warm-up). The peak comes from `peak_flops` below, which train.py uses too: a GPU's spec sheet, or on
a CPU a timed 1024^3 float32 matmul on each process's threads (torchrun gives each worker 1 thread,
a process alone gets all cores), so a CPU's MFU is relative to what this machine showed it can do.
Configurations: the CPU preset (3.2M parameters, windows of 256) and the seed's 39.6M model (windows
of 512) with a small batch, since a 524,288-token step would take an hour here.

Run: python 07_pretrain_ddp/bench.py            (~10 minutes on 2 cores; needs data/shakespeare, which
     python 07_pretrain_ddp/train.py builds, or builds it itself the same way)
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


def run(flags: list[str], procs: int, windows: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        launcher = [sys.executable] + ([] if procs == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"])
        cmd = [*launcher, str(ROOT / "07_pretrain_ddp" / "train.py"), *flags, *SHAKESPEARE, "--device", "cpu", "--out_dir", out,
               "--batch_size", str(windows // procs), "--max_steps", str(steps), "--warmup_steps", "1", "--eval_tokens", "1",
               "--sample_tokens", "0", "--log_interval", "1"]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()][2:]  # no step 0, 1
    return {k: statistics.median(r[k] for r in records) for k in ("tokens_per_s", "mfu")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not counted)")
    parser.add_argument("--procs", default="1,2", help="process counts to compare, comma-separated")
    args = parser.parse_args()
    print("| configuration | processes | global batch | tokens/s | MFU |\n|---|---|---|---|---|")
    for name, (flags, windows) in CONFIGS.items():
        for procs in map(int, args.procs.split(",")):
            r = run(flags, procs, windows, args.steps)
            print(f"| {name} | {procs} | {windows} windows | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
