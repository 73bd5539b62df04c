"""Benchmark: aggregate tokens/s and time to first token under N concurrent streaming clients, for one request
at a time (max_batch 1), static batching and continuous batching.

    python 12_serve/bench.py                                   # a random-init model of the default config (39.6M)
    python 12_serve/bench.py --checkpoint out/ckpt_best        # the main job's model
    python 12_serve/bench.py --clients 16 --modes one,continuous --requests 2 --max_tokens 32   # one column, quickly
    python 12_serve/bench.py --limit                           # no server: one decode step at 1..32 rows, the ideal speed-up,
                                                               # and batch-1 decoding (--llama_bench PATH --gguf F: beside llama.cpp's)
    python 12_serve/bench.py --modes one,continuous --clients 1,16,32 --llama_server PATH --gguf out/lillm.gguf

Per mode, serve.py's app runs in this process on a loopback port; from a second process, each of N clients sends
--requests greedy streaming /v1/completions requests one after the other, each for max_tokens/4..max_tokens tokens
(greedy: every mode does the same work). Reported: completion tokens / wall time, p50 and p95 time to first text, the
largest batch, the KV cache (allocated up front), the weights and the process's peak memory. Then, for 16 and 32
clients, continuous batching's speed-up over one at a time beside the ideal B t(1) / t(B) from the engine's own decode
step at B rows and 1 row (what batching could give if the decode step alone cost time), also at the rows a step held
on average (clients come and go, so fewer than B), and with the prefills as measured (Amdahl: batching shortens the
decoding, not the prefills, which are compute-bound already), and the median time to first token against a lone one's.
--llama_server: the same clients against llama.cpp's own server (-np = clients, continuous batching) on lesson 06's
GGUF of the same weights.
"""

import argparse
import asyncio
import contextlib
import copy
import functools
import json
import multiprocessing
import random
import resource
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
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
generate = import_module("06_model.generate")
int8 = import_module("06_model.int8")
timed = import_module("06_model.bench").timed

TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that "
        "lour'd upon our house in the deep bosom of the ocean buried. Now are our brows bound with victorious "
        "wreaths; our bruised arms hung up for monuments; our stern alarums changed to merry meetings, our "
        "dreadful marches to delightful measures. Grim-visaged war hath smooth'd his wrinkled front; and now, "
        "instead of mounting barbed steeds to fright the souls of fearful adversaries, he capers nimbly in a "
        "lady's chamber to the lascivious pleasing of a lute. ") * 4


async def one_client(http, jobs: list, out: list):
    """Each job (prompt, max_tokens) streamed in turn; out gets (sent, first text, last token, tokens) per job. Each
    request on a connection of its own (Connection: close): llama-server drops a kept-alive connection now and then
    under many clients ("Server disconnected without sending a response"); on loopback a connection costs ~0.1 ms."""
    for prompt, max_tokens in jobs:
        body = {"model": "lillm", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        start, first, tokens, pieces = time.perf_counter(), None, 0, 0
        async with http.stream("POST", "/v1/completions", json=body, headers={"Connection": "close"}) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        first, pieces = first or time.perf_counter(), pieces + 1
                    tokens = chunk["usage"]["completion_tokens"] if chunk.get("usage") else tokens
        tokens = tokens or pieces  # a server that sends no usage: one piece per token (llama.cpp streams so)
        out.append((start, first or time.perf_counter(), time.perf_counter(), tokens))


def run_clients(url: str, jobs_per_client: list) -> list:
    """One client per list of jobs, all at once: the (sent, first text, last token, tokens) of every request."""
    async def clients():
        out, limits = [], httpx.Limits(max_connections=len(jobs_per_client) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
            await asyncio.gather(*(one_client(http, jobs, out) for jobs in jobs_per_client))
        return out
    return asyncio.run(clients())


def time_clients(url: str, n_clients: int, args) -> tuple:
    """One warm-up request, then n_clients clients: (their results, wall seconds). The clients run in args.pool, a process
    of their own, as a server's clients are: in the server's process their HTTP parsing would share the interpreter lock
    with the engine's thread (at 16 clients on 2 cores the difference measured small: 3.55x against 3.56x). Times are
    time.perf_counter(), the system-wide monotonic clock on Linux, so both processes read the same one."""
    args.pool.submit(run_clients, url, [[(args.prompts[0], 2)]]).result()
    start = time.perf_counter()
    results = args.pool.submit(run_clients, url, jobs_for(n_clients, args)).result()
    return results, max(r[2] for r in results) - start


def measure(model, tokenizer, mode: str, n_clients: int, args) -> dict:
    engine = batching.Engine(model, max_batch=1 if mode == "one" else args.max_batch, max_waiting=256,
                             policy="static" if mode == "static" else "continuous")
    running = serve.InThread(serve.create_app(engine, tokenizer, "lillm"))
    try:
        results, wall = time_clients(running.url, n_clients, args)
    finally:
        running.close()
    kv_mb = sum(k.numel() * k.element_size() * 2 for k in engine.k) / 2**20
    # FastAPI keeps the endpoint functions in a module-level lru_cache, and their closures hold this engine:
    # free its cache by hand, or every mode's cache would stay in memory until the end.
    engine.k.clear()
    engine.v.clear()
    return {**summary(mode, n_clients, results, wall, engine.peak_rows, round(kv_mb, 1), engine.steps), "prefill_s": round(engine.prefill_seconds, 2)}


def summary(mode: str, n_clients: int, results: list, wall: float, peak_batch, kv_mb, steps=None) -> dict:
    ttft, tokens = sorted(r[1] - r[0] for r in results), sum(r[3] for r in results)
    return {"mode": mode, "clients": n_clients, "requests": len(results), "tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p95_s": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 3), "peak_batch": peak_batch, "kv_cache_mb": kv_mb,
            "mean_rows": round((tokens - len(results)) / steps, 2) if steps else None}  # rows per decode step (first tokens: prefill)


def jobs_for(n_clients: int, args) -> list:
    rng = random.Random(n_clients)  # the same requests in every mode, llama.cpp's included
    return [[(rng.choice(args.prompts), rng.randint(max(1, args.max_tokens // 4), args.max_tokens)) for _ in range(args.requests)]
            for _ in range(n_clients)]


def measure_llama(n_clients: int, args) -> dict:
    """The same clients against llama.cpp's server: -np n_clients slots (continuous batching), each with the model's
    whole window, --threads as ours, greedy; lesson 06's GGUF of the same weights."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = args.window * n_clients
    server = subprocess.Popen([args.llama_server, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(n_clients),
                               "-c", str(ctx), "--threads", str(args.threads), "--threads-batch", str(args.threads), "--no-webui",
                               "-a", "lillm"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # until it has loaded the model
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        return summary("llama.cpp", n_clients, *time_clients(url, n_clients, args), n_clients, None)
    finally:
        server.terminate()
        server.wait(timeout=30)


@torch.inference_mode()
def decode_step_times(model, sizes, prompt: int = 64, repeats: int = 9) -> dict:
    """{rows: median seconds of one decode step} for the engine with that many rows, each past a prompt of `prompt`
    tokens (prefilled first, all in one forward), and the prefill's seconds per prompt token at the largest size."""
    rng, V, out = random.Random(0), model.config.vocab_size, {}
    for n in sizes:
        engine = batching.Engine(model, max_batch=n, max_waiting=n, prefill_tokens=prompt * n)
        for _ in range(n):
            engine.submit(batching.Request([rng.randrange(16, V) for _ in range(prompt)], repeats + 2))
        start = time.perf_counter()
        engine.join()  # every prompt in one forward
        out["prefill_per_token"] = (time.perf_counter() - start) / (prompt * n)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        out[n] = statistics.median(times)
    return out


def limit(model, sizes) -> dict:
    """The table of what batching can give on this machine: one decode step at B rows, its tokens/s, B t(1) / t(B)."""
    t = decode_step_times(model, sizes)
    print(f"{'rows':>4} {'step ms':>8} {'tokens/s':>8} {'ideal speed-up B t(1)/t(B)':>27}   (prefill {t['prefill_per_token'] * 1e3:.2f} ms/token)")
    for n in sizes:
        print(f"{n:>4} {t[n] * 1e3:>8.1f} {n / t[n]:>8.0f} {n * t[1] / t[n]:>27.2f}", flush=True)
    return t


def batch_one(model, args) -> dict:
    """Greedy decoding of one row with lesson 06's generate in each of its modes, then llama.cpp's own llama-bench
    (tg: tokens generated, no prompt) on lesson 06's GGUF of the same weights at the same threads: {mode: tokens/s}."""
    n, out = 128, {}
    for mode in ("eager", "compile", "int8", "int8+compile"):
        m = int8.quantize_int8(copy.deepcopy(model)) if "int8" in mode else model
        run = functools.partial(generate.generate, m, [[1]], n, stop_id=None, compile="compile" in mode)
        run()  # warm up (and compile)
        out[mode] = n / min(timed(run) for _ in range(3))
    if args.llama_bench:
        report = subprocess.run([args.llama_bench, "-m", args.gguf, "-p", "0", "-n", str(n), "-t", str(args.threads), "-r", "3",
                                 "-o", "json"], capture_output=True, text=True, check=True).stdout
        out["llama.cpp"] = json.loads(report)[0]["avg_ts"]
    print(f"batch 1, greedy, {n} tokens, {args.threads} thread(s):")
    for mode, speed in out.items():
        versus = f"  ({speed / out['llama.cpp']:.2f}x llama.cpp)" if "llama.cpp" in out and mode != "llama.cpp" else ""
        print(f"  {mode:>14} {speed:8.0f} tokens/s{versus}", flush=True)
    return out


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
    parser.add_argument("--limit", "--engine_only", action="store_true", help="no server: one decode step at 1, 2, 4, 8, 16, 32 rows")
    parser.add_argument("--llama_server", default=None, help="llama.cpp's llama-server binary: run the same clients against it too")
    parser.add_argument("--llama_bench", default=None, help="with --limit: llama.cpp's llama-bench binary, batch 1 beside lilLM's")
    parser.add_argument("--gguf", default=None, help="with --llama_server or --llama_bench: lesson 06's GGUF of the same weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with weights.one_line_errors():
        if args.checkpoint:
            model, tokenizer, _ = weights.load_pair(args.checkpoint, args.tokenizer)
        else:
            tokenizer = tokenizer_lib.load_tokenizer(args.tokenizer or tokenizer_lib.DEFAULT_TOKENIZER_PATH)
            model = lillm.LilLM(lillm.ModelConfig()).eval()
    sizes = [n for n in (1, 2, 4, 8, 16, 32) if n <= args.max_batch]
    if args.limit:
        return limit(model, sizes), batch_one(model, args)
    args.window, args.pool = model.config.max_seq_len, ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
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
        for mode in args.modes.split(",") + (["llama.cpp"] if args.llama_server else []):
            rows.append(r := measure_llama(n, args) if mode == "llama.cpp" else measure(model, tokenizer, mode, n, args))
            print(f"{mode:>10} {n:>7} {r['tokens']:>6} {r['seconds']:>7.1f} {r['tokens_per_s']:>8.1f} "
                  f"{r['ttft_p50_s']:>8.3f} {r['ttft_p95_s']:>8.3f} {r['peak_batch']:>5} {r['kv_cache_mb'] or '-':>6}", flush=True)
    by, ttft, secs, pre = ({(r["mode"], r["clients"]): r.get(key) for r in rows}
                           for key in ("tokens_per_s", "ttft_p50_s", "seconds", "prefill_s"))
    rows_of = {r["clients"]: r["mean_rows"] for r in rows if r["mode"] == "continuous"}
    occupied = {max(1, round(m)) for n, m in rows_of.items() if n in (16, 32)}
    step = decode_step_times(model, sorted({1} | {n for n in (16, 32) if n <= args.max_batch} | occupied))
    for n in (16, 32):
        if ("one", n) in by and ("continuous", n) in by:
            ideal, got = n * step[1] / step[min(n, args.max_batch)], by["continuous", n] / by["one", n]
            m = max(1, round(rows_of[n]))  # the clients come and go: the batch held m rows on average, not n
            print(f"{n} clients: continuous batching / one at a time = {got:.2f}x aggregate tokens/s; ideal "
                  f"B t(1)/t(B) = {ideal:.2f}x: {100 * got / ideal:.0f}% of it; at the {rows_of[n]:.1f} rows a step held on "
                  f"average, {m} t(1)/t({m}) = {m * step[1] / step[m]:.2f}x: {100 * got / (m * step[1] / step[m]):.0f}% of it")
            # Amdahl: batching shortens the rest of one at a time's wall time by the ideal, not the prefills (compute-bound)
            one_s, one_pre, cont_pre = secs["one", n], pre["one", n], pre["continuous", n]
            bound = one_s / (cont_pre + (one_s - one_pre) / ideal)
            print(f"{n} clients: prefill took {one_pre:.1f} of {one_s:.1f} s one at a time and {cont_pre:.1f} of "
                  f"{secs['continuous', n]:.1f} s continuous; with the prefills as measured the ideal is "
                  f"{bound:.2f}x: {100 * got / bound:.0f}% of it")
        if ("continuous", n) in ttft and ("continuous", 1) in ttft:
            print(f"{n} clients: median time to first token {ttft['continuous', n] * 1e3:.0f} ms, "
                  f"{ttft['continuous', n] / ttft['continuous', 1]:.2f}x a lone request's ({ttft['continuous', 1] * 1e3:.0f} ms)")
        if ("llama.cpp", n) in by and ("continuous", n) in by:
            print(f"{n} clients: lilLM / llama.cpp's server = {by['continuous', n] / by['llama.cpp', n]:.2f}x aggregate tokens/s")
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    print(f"memory: weights {weights_mb:.1f} MB; KV cache as above (allocated whole at start: max_batch x max_seq_len "
          f"positions); peak resident memory of this process {peak_rss:.0f} MB (server, clients and every mode together)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
