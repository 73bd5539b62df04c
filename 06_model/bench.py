"""Benchmark: LilLM against transformers' LlamaForCausalLM with the same config and the same weights.

Both models are built here from one set of weights (hf.py's mapping) and timed in alternation, step by step,
so a shared machine slows both alike: read the RATIOS (notes.md, Speed; figures in BENCHMARKS.md) of training
steps (tokens/s, MFU) and of greedy decoding (lilLM eager, compiled, int8). On a shared machine, --threads 1.

    python 06_model/bench.py --threads 1 --steps 2 --modes fp32,fp32+compile   # notes.md's run, ~35 min
    python 06_model/bench.py --only generate --new_tokens 64 --gen_batches 1
"""

import argparse
import copy
import os
import statistics
import sys
import time
from importlib import import_module
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
lillm = import_module("06_model.model")
hf = import_module("06_model.hf")
int8 = import_module("06_model.int8")
generate = import_module("06_model.generate")
weights = import_module("06_model.weights")

MODES = ["fp32", "bf16", "fp32+compile", "bf16+compile"]
GEN_MODES = ["eager", "compile", "int8", "int8+compile"]


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """Best FLOP/s of an n x n x n matmul: the roof that MFU is measured against. Best over the three
    layouts a training step uses (x W, x W^T, x^T W): without bf16 units they differ up to 15x in bf16."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for f in (lambda: a @ b, lambda: a @ b.T, lambda: a.T @ b):
        f()
        best = min([best] + [timed(f) for _ in range(repeats)])
    return 2 * n**3 / best


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def reference(model):
    """transformers' LlamaForCausalLM holding `model`'s weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = LlamaForCausalLM(LlamaConfig(**hf.hf_config(model.config, torch.float32)))
    missing, unexpected = ref.load_state_dict(hf.hf_state_dict(model), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)  # lm_head is tied
    return ref


def bench_train(model, args):
    # Only the dtypes the chosen modes use: a CPU without bf16 matmul units (AVX2) runs bf16 ~50x slower.
    dtypes = sorted({torch.bfloat16 if m.startswith("bf16") else torch.float32 for m in args.modes}, key=str)
    peaks = {dt: matmul_peak(dt, args.peak_n) for dt in dtypes}
    print(f"matmul peak ({args.peak_n}^3): " + ", ".join(f"{str(dt)[6:]} {p / 1e9:.1f} GFLOP/s" for dt, p in peaks.items())
          + f"; {model.flops_per_token(args.seq) / 1e6:.1f} MFLOP per trained token")
    B, T, V = args.batch, args.seq, model.config.vocab_size
    data = torch.randint(0, V, (B, T + 1))
    x, y = data[:, :-1], data[:, 1:]
    print(f"\n## training step: forward + backward + AdamW, batch {B} x {T}, {args.steps} timed steps after {args.warmup}")
    print(f"{'mode':14s} {'lilLM tok/s':>12s} {'HF tok/s':>10s} {'ratio':>6s}")
    results = {}
    for mode in args.modes:
        bf16, compiled = mode.startswith("bf16"), mode.endswith("+compile")

        def step(net, is_ref, opt):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                # transformers shifts the labels itself: labels = inputs (T - 1 predictions vs our T).
                loss = net(input_ids=x, labels=x).loss if is_ref else net(x, y)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        runs = [(torch.compile(net) if compiled else net, is_ref, torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.1), [])
                for net, is_ref in ((copy.deepcopy(model).train(), False), (reference(model).train(), True))]
        for i in range(args.warmup + args.steps):  # alternate the two models step by step
            for net, is_ref, opt, times in runs:
                dt = timed(lambda: step(net, is_ref, opt))
                if i >= args.warmup:
                    times.append(dt)
        results[mode] = [B * T / statistics.median(times) for *_, times in runs]
        print(f"{mode:14s} {results[mode][0]:12.0f} {results[mode][1]:10.0f} {results[mode][0] / results[mode][1]:6.2f}", flush=True)
    # On a shared machine the peak itself moves: measured again now, the best of both is the roof.
    peaks = {dt: max(p, matmul_peak(dt, args.peak_n)) for dt, p in peaks.items()}
    print("MFU against the best matmul peak of start and end (" + ", ".join(
        f"{str(dt)[6:]} {p / 1e9:.1f} GFLOP/s" for dt, p in peaks.items()) + "):")
    for mode, tps in results.items():
        peak = peaks[torch.bfloat16 if mode.startswith("bf16") else torch.float32]
        print(f"{mode:14s} lilLM {tps[0] * model.flops_per_token(T) / peak:6.1%}   HF {tps[1] * model.flops_per_token(T) / peak:6.1%}")


def bench_generate(model, args):
    ref = reference(model).eval()
    model.eval()
    quantized = int8.quantize_int8(copy.deepcopy(model)) if any(m.startswith("int8") for m in args.gen_modes) else None
    N, P = args.new_tokens, args.prompt_len
    print(f"\n## greedy generation: prompt {P}, {N} new tokens, transformers in float32, "
          f"{args.repeats} timed runs after one warm-up")
    print("same tokens: the fewest leading tokens, over the rows, equal to transformers' greedy tokens")
    print(f"{'batch':>5s} {'mode':13s} {'lilLM tok/s':>12s} {'HF tok/s':>10s} {'ratio':>6s}  same tokens")
    for B in args.gen_batches:
        prompts = torch.randint(3, model.config.vocab_size, (B, P))

        def theirs():
            return ref.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=N,
                                min_new_tokens=N, do_sample=False, pad_token_id=2)

        for mode in args.gen_modes:
            net = quantized if mode.startswith("int8") else model

            def ours():
                return generate.generate(net, prompts.tolist(), N, stop_id=None, compile=mode.endswith("compile"))

            # warm-up (and compilation) and the correctness check
            same = min(int8.equal_prefix(a, b) for a, b in zip(ours(), theirs()[:, P:].tolist()))
            times = [(timed(ours), timed(theirs)) for _ in range(args.repeats)]  # in alternation
            a, b = (B * N / statistics.median(t) for t in zip(*times))
            print(f"{B:5d} {mode:13s} {a:12.1f} {b:10.1f} {a / b:6.2f}  {same}/{N}", flush=True)


def main():
    parser = argparse.ArgumentParser(description="lilLM vs transformers' Llama: training and generation speed on this CPU.")
    parser.add_argument("--only", choices=["all", "train", "generate"], default="all", help="which half to run")
    parser.add_argument("--modes", default=",".join(MODES), help=f"training modes, comma-separated from {MODES}")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per model and mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps first (compilation)")
    parser.add_argument("--batch", type=int, default=8, help="training batch size")
    parser.add_argument("--seq", type=int, default=512, help="training sequence length")
    parser.add_argument("--prompt_len", type=int, default=16, help="generation prompt length")
    parser.add_argument("--new_tokens", type=int, default=256, help="tokens generated per row")
    parser.add_argument("--gen_batches", default="1,8", help="generation batch sizes, comma-separated")
    parser.add_argument("--gen_modes", default=",".join(GEN_MODES), help=f"lilLM decode steps, from {GEN_MODES}")
    parser.add_argument("--repeats", type=int, default=2, help="timed generation runs per model")
    parser.add_argument("--peak_n", type=int, default=2048, help="matmul size for the peak FLOP/s")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args()
    args.modes, args.gen_modes = args.modes.split(","), args.gen_modes.split(",")
    args.gen_batches = [int(b) for b in args.gen_batches.split(",")]
    with weights.one_line_errors():
        for given, known in ((args.modes, MODES), (args.gen_modes, GEN_MODES)):
            if bad := set(given) - set(known):
                raise ValueError(f"unknown modes {sorted(bad)}: choose from {known}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = lillm.LilLM(lillm.ModelConfig())
    print(f"lilLM default config, {model.num_params():,} parameters; torch {torch.__version__}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.only in ("all", "train"):
        bench_train(model, args)
    if args.only in ("all", "generate"):
        bench_generate(model, args)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
