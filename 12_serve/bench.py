"""Benchmark: aggregate tokens/s and time to first token under N concurrent streaming clients, for one request
at a time (max_batch 1), static batching and continuous batching.

    python 12_serve/bench.py                                   # a random-init model of the default config (39.6M)
    python 12_serve/bench.py --checkpoint out/ckpt_best        # the main job's model
    python 12_serve/bench.py --clients 16 --modes one,continuous --requests 2 --max_tokens 32   # one column, quickly
    python 12_serve/bench.py --engine_only                     # no server: prefill and decode step times, 1-32 rows

Per mode, serve.py's app runs in this process on a loopback port; each of N clients sends --requests greedy
streaming /v1/completions requests one after the other, each for max_tokens/4..max_tokens tokens (greedy:
every mode does the same work). Reported: completion tokens / wall time, p50 and p95 time to first text,
the largest batch, the KV cache (allocated up front), the weights and the process's peak memory.
"""

import argparse
import asyncio
import json
import random
import resource
import statistics
import sys
import time
from importlib import import_module
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
lillm = import_module("06_model.model")
weights = import_module("06_model.weights")
tokenizer_lib = import_module("01_tokenizer.tokenizer")
batching = import_module("12_serve.batching")
serve = import_module("12_serve.serve")

TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that "
        "lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound with victorious "
        "wreaths; our bruised arms hung up for monuments; our stern alarums changed to merry meetings, our "
        "dreadful marches to delightful measures. Grim-visaged war hath smooth'd his wrinkled front; and now, "
        "instead of mounting barbed steeds to fright the souls of fearful adversaries, he capers nimbly in a "
        "lady's chamber to the lascivious pleasing of a lute. ") * 4


async def one_client(http, jobs: list, out: list):
    """Each job (prompt, max_tokens) streamed in turn; out gets (sent, first text, last token, tokens) per job."""
    for prompt, max_tokens in jobs:
        body = {"model": "lillm", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        start, first, tokens = time.perf_counter(), None, 0
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        first = time.perf_counter()
                    tokens = chunk["usage"]["completion_tokens"] if chunk.get("usage") else tokens
        out.append((start, first or time.perf_counter(), time.perf_counter(), tokens))


async def clients(url: str, jobs_per_client: list) -> list:
    out, limits = [], httpx.Limits(max_connections=len(jobs_per_client) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await asyncio.gather(*(one_client(http, jobs, out) for jobs in jobs_per_client))
    return out


def measure(model, tokenizer, mode: str, n_clients: int, args) -> dict:
    engine = batching.Engine(model, max_batch=1 if mode == "one" else args.max_batch, max_waiting=256,
                             policy="static" if mode == "static" else "continuous")
    running = serve.InThread(serve.create_app(engine, tokenizer, "lillm"))
    try:
        asyncio.run(clients(running.url, [[(args.prompts[0], 2)]]))  # warm up
        rng = random.Random(n_clients)  # the same requests in every mode
        jobs = [[(rng.choice(args.prompts), rng.randint(max(1, args.max_tokens // 4), args.max_tokens))
                 for _ in range(args.requests)] for _ in range(n_clients)]
        start = time.perf_counter()
        results = asyncio.run(clients(running.url, jobs))
        wall = max(r[2] for r in results) - start
    finally:
        running.close()
    kv_mb = sum(k.numel() * k.element_size() * 2 for k in engine.k) / 2**20
    # FastAPI keeps the endpoint functions in a module-level lru_cache, and their closures hold this engine:
    # free its cache by hand, or every mode's cache would stay in memory until the end.
    engine.k.clear()
    engine.v.clear()
    ttft, tokens = sorted(r[1] - r[0] for r in results), sum(r[3] for r in results)
    return {"mode": mode, "clients": n_clients, "requests": len(results), "tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p95_s": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 3),
            "peak_batch": engine.peak_rows, "kv_cache_mb": round(kv_mb, 1)}


@torch.inference_mode()
def engine_alone(model, max_batch: int):
    """No HTTP: prefill time per prompt token, and one decode step's time with 1 .. max_batch rows."""
    rng, V = random.Random(0), model.config.vocab_size
    print(f"{'rows':>4} {'prefill ms/token':>16} {'decode step ms':>14} {'tokens/s':>8}")
    for n in sorted({1, 4, 16, max_batch} & set(range(1, max_batch + 1))):
        engine = batching.Engine(model, max_batch=n, max_waiting=n, prefill_tokens=64 * n)
        for _ in range(n):
            engine.submit(batching.Request([rng.randrange(16, V) for _ in range(64)], 40))
        start = time.perf_counter()
        engine.join()  # every prompt in one forward
        prefill = (time.perf_counter() - start) / (64 * n)
        times = []
        for _ in range(9):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        step = statistics.median(times)
        print(f"{n:>4} {prefill * 1e3:>16.2f} {step * 1e3:>14.1f} {n / step:>8.0f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serving throughput and time to first token: one at a time, static, continuous.")
    parser.add_argument("--checkpoint", default=None, help="a lilLM checkpoint (default: random-init default config, 39.6M)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the checkpoint, else data/tokenizer.json)")
    parser.add_argument("--clients", default="1,4,16,32", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--modes", default="one,static,continuous", help="comma-separated: one, static, continuous")
    parser.add_argument("--requests", type=int, default=2, help="requests each client sends, one after the other")
    parser.add_argument("--max_tokens", type=int, default=64, help="each request asks for max_tokens/4 .. max_tokens tokens")
    parser.add_argument("--prompt_min", type=int, default=8, help="shortest prompt, tokens")
    parser.add_argument("--prompt_max", type=int, default=64, help="longest prompt, tokens")
    parser.add_argument("--max_batch", type=int, default=32, help="rows of the static and continuous batches")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steady on a shared machine)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--engine_only", action="store_true", help="time the engine's prefill and decode step alone, no server")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with weights.one_line_errors():
        if args.checkpoint:
            model, tokenizer, _ = weights.load_pair(args.checkpoint, args.tokenizer)
        else:
            tokenizer = tokenizer_lib.load_tokenizer(args.tokenizer or tokenizer_lib.DEFAULT_TOKENIZER_PATH)
            model = lillm.LilLM(lillm.ModelConfig()).eval()
    if args.engine_only:
        return engine_alone(model, args.max_batch)
    ids, rng = tokenizer.encode(TEXT).ids, random.Random(0)
    lengths = [rng.randint(args.prompt_min, min(args.prompt_max, len(ids), model.config.max_seq_len - args.max_tokens))
               for _ in range(16)]
    args.prompts = [tokenizer.decode(ids[:n]) for n in lengths]
    print(f"{model.num_params():,} parameters, window {model.config.max_seq_len}, {args.threads} thread(s); "
          f"prompts of {min(lengths)}-{max(lengths)} tokens, answers up to {args.max_tokens} tokens, "
          f"{args.requests} requests per client")
    print(f"{'mode':>10} {'clients':>7} {'tokens':>6} {'seconds':>7} {'tokens/s':>8} {'TTFT p50':>8} {'TTFT p95':>8} "
          f"{'batch':>5} {'KV MB':>6}")
    rows = []
    for n in [int(c) for c in args.clients.split(",")]:
        for mode in args.modes.split(","):
            rows.append(r := measure(model, tokenizer, mode, n, args))
            print(f"{mode:>10} {n:>7} {r['tokens']:>6} {r['seconds']:>7.1f} {r['tokens_per_s']:>8.1f} "
                  f"{r['ttft_p50_s']:>8.3f} {r['ttft_p95_s']:>8.3f} {r['peak_batch']:>5} {r['kv_cache_mb']:>6.1f}", flush=True)
    by = {(r["mode"], r["clients"]): r["tokens_per_s"] for r in rows}
    for n in sorted({r["clients"] for r in rows}):
        if ("one", n) in by and ("continuous", n) in by:
            print(f"{n} clients: continuous batching / one at a time = {by['continuous', n] / by['one', n]:.1f}x aggregate tokens/s")
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    print(f"memory: weights {weights_mb:.1f} MB; KV cache as above (allocated whole at start: max_batch x max_seq_len "
          f"positions); peak resident memory of this process {peak_rss:.0f} MB (server, clients and every mode together)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
