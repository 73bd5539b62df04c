"""Benchmarks for notes.md and BENCHMARKS.md: BPE from scratch against the library, and the token files.

  bpe      bpe.py and `tokenizers` trained on the default corpus at vocab 8192; both times, merges equal.
  plain    bpe.py's train_plain against ByteLevelBPE.train on the first ~200 KB at vocab 1024, best of 3.
  prepare  prepare.py's MB/s and tokens/s against a bare encode_batch over the same text in memory, on the
           default corpus (one shard, this process) and at scale (the corpus 12x in 8 parquet shards, a pool
           of --workers processes), best of 3 interleaved runs; then prepare.py's peak RSS on the default
           corpus and on one 4x larger: bounded memory means the two peaks are about equal.

Wall times stretch on a busy machine; CPU seconds (this process and its finished children) are fairer.

Demo: python 01_tokenizer/bench.py              (all three, ~3 minutes on 2 cores)
      python 01_tokenizer/bench.py --only plain    (~15 s)
      python 01_tokenizer/bench.py --only prepare  (~2 minutes)
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import import_module
from pathlib import Path

import pyarrow as pa  # installed with datasets
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
commands = import_module("01_tokenizer.commands")
bpe = import_module("01_tokenizer.bpe")
corpus = import_module("01_tokenizer.corpus")
tokenizer_lib = import_module("01_tokenizer.tokenizer")
prepare = import_module("01_tokenizer.prepare")
shards = import_module("01_tokenizer.shards")


def timed(fn, repeat: int = 1):
    """(result, wall s, CPU s of this process and its finished children: a pool's workers) of fn(), the fastest
    of `repeat` runs (single runs of 0.1 s are noisy)."""
    runs = []
    for _ in range(repeat):
        t, wall = os.times(), time.perf_counter()
        result = fn()
        u = os.times()
        runs.append((result, time.perf_counter() - wall, sum(u[:4]) - sum(t[:4])))
    return runs[0][0], min(r[1] for r in runs), min(r[2] for r in runs)


def bench_bpe(docs: list[str], vocab_size: int):
    lib, t_lib, cpu_lib = timed(lambda: tokenizer_lib.train_tokenizer(docs, vocab_size))
    mine, t_mine, cpu_mine = timed(lambda: bpe.ByteLevelBPE.train(docs, vocab_size, tokenizer_lib.SPECIAL_TOKENS))
    lib_merges = [tuple(m) for m in json.loads(lib.to_str())["model"]["merges"]]
    same = mine.merges == lib_merges and mine.vocab == lib.get_vocab()
    print(f"BPE training on {sum(map(len, docs)) / 1e6:.2f} M characters, vocab {vocab_size} ({len(lib_merges)} merges)")
    print(f"  tokenizers (Rust)   {t_lib:5.1f} s wall  {cpu_lib:5.1f} s CPU (all threads)")
    print(f"  bpe.py (Python)     {t_mine:5.1f} s wall  {cpu_mine:5.1f} s CPU   "
          f"({t_mine / t_lib:.1f}x the library's wall time)")
    print(f"  merges and vocab identical: {same}")
    assert same, "bpe.py must learn exactly the library's merges"


def bench_plain(docs: list[str], chars: int, vocab_size: int):
    starts = itertools.accumulate(map(len, docs), initial=0)
    excerpt = [d for d, start in zip(docs, starts) if start <= chars]  # up to the first document past `chars`
    args = (excerpt, vocab_size, tokenizer_lib.SPECIAL_TOKENS)
    _, t_count, cpu_count = timed(lambda: bpe.count_words(excerpt, tokenizer_lib.SPECIAL_TOKENS), 3)
    plain, t_plain, cpu_plain = timed(lambda: bpe.train_plain(*args), 3)
    fast, t_fast, cpu_fast = timed(lambda: bpe.ByteLevelBPE.train(*args), 3)
    same = plain.merges == fast.merges and plain.vocab == fast.vocab
    print(f"BPE trainers on {sum(map(len, excerpt)) / 1e6:.2f} M characters, vocab {vocab_size} "
          f"({len(fast.merges)} merges), best of 3")
    print(f"  count_words (both start with it)  {t_count:6.2f} s wall  {cpu_count:6.2f} s CPU")
    print(f"  train_plain (recounts all pairs)  {t_plain:6.2f} s wall  {cpu_plain:6.2f} s CPU")
    print(f"  ByteLevelBPE.train (kept counts)  {t_fast:6.2f} s wall  {cpu_fast:6.2f} s CPU   {t_plain / t_fast:.0f}x "
          f"faster ({(t_plain - t_count) / (t_fast - t_count):.0f}x after count_words)")
    print(f"  merges and vocab identical: {same}")
    assert same, "train_plain and ByteLevelBPE.train must learn the same merges"


def throughput(title: str, label: str, docs: list[str], n: int, spec: str, tok_path, out: Path, workers):
    """Bare encode_batch and encode_batch_fast over `docs` n times, against prepare.prepare(spec) (which holds
    them n times over), interleaved, best of 3; one row each in MB/s and tokens/s."""
    tok = tokenizer_lib.load_tokenizer(tok_path)
    mb = n * sum(len(d.encode("utf-8")) for d in docs) / 1e6
    runs = {"bare": [], "fast": [], "prepare": []}  # (wall, CPU) seconds
    for k in range(3):  # interleaved: on a shared machine other jobs slow down single runs
        counts, *seconds = timed(lambda: [sum(len(e.ids) + 1 for e in tok.encode_batch(docs, add_special_tokens=False))
                                          for _ in range(n)])  # + 1: the </s> after each document
        n_tokens = sum(counts)
        runs["bare"].append(seconds)
        runs["fast"].append(timed(lambda: [tok.encode_batch_fast(docs, add_special_tokens=False) for _ in range(n)])[1:])
        meta, *seconds = timed(lambda: prepare.prepare(spec, tok_path, out / str(k), workers=workers, progress=False))
        runs["prepare"].append(seconds)
        assert meta["train_tokens"] + meta["val_tokens"] == n_tokens, "prepare must write exactly the encoded tokens"
    best = {name: min(times) for name, times in runs.items()}
    print(f"{title}: {mb:.2f} MB, {n_tokens:,} tokens ({os.cpu_count()} cores, best of 3)")
    for name, (seconds, cpu) in [("encode_batch (bare, text in RAM)", best["bare"]),
                                 ("encode_batch_fast (bare)", best["fast"]),
                                 (f"prepare.prepare {label}", best["prepare"])]:
        print(f"  {name:37s} {seconds:5.1f} s wall ({cpu:5.1f} s CPU)  {mb / seconds:5.2f} MB/s  "
              f"{n_tokens / seconds / 1e3:5.0f} k tokens/s")
    print(f"  prepare: {best['bare'][0] / best['prepare'][0]:.0%} of bare encode_batch's MB/s "
          f"({best['fast'][0] / best['prepare'][0]:.0%} of encode_batch_fast's)")


# Runs a script and prints its peak RSS (VmHWM) at exit. Not getrusage: Linux keeps ru_maxrss across
# fork and exec, so a child would report this (large) benchmark process' memory as its own.
PEAK_RSS_WRAPPER = """import atexit, runpy, sys
atexit.register(lambda: print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')"""


def peak_rss_mb(*args: str) -> float:
    """Peak resident memory, in MB, of `python 01_tokenizer/prepare.py args...` (Linux: /proc/self/status)."""
    cmd = [sys.executable, "-c", PEAK_RSS_WRAPPER, "01_tokenizer/prepare.py", *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"prepare.py {' '.join(args)} failed: {result.stderr}"
    return int(result.stderr.strip().splitlines()[-1].split()[1]) / 1024  # "VmHWM:  123456 kB"


def bench_prepare(docs: list[str], tok_path: Path, work: Path, scale: int, parquet_scale: int, workers: int | None):
    throughput("Token files for the default corpus", "(read+encode+write)", docs, 1, "shakespeare", tok_path,
               work / "x0", 1)
    n, shard_dir = parquet_scale, work / f"parquet_x{parquet_scale}"
    shard_dir.mkdir()
    for k in range(8):
        part = (docs * n)[k::8]  # every shard a mix of the whole corpus
        pq.write_table(pa.table({"text": part}), shard_dir / f"{k}.parquet", row_group_size=64)
    n_workers = min(workers or shards.cpu_count(), 8)
    throughput("At scale, in 8 parquet shards", f"({n_workers} worker processes)", docs, n,
               str(shard_dir / "*.parquet"), tok_path, work / "xp", workers)

    big = work / f"shakespeare_x{scale}.jsonl"
    with open(big, "w", encoding="utf-8") as f:
        for _ in range(scale):
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    rss_imports = peak_rss_mb("--tokenizer", str(tok_path), "--help")  # imports and argument parsing only
    rss_1 = peak_rss_mb("--tokenizer", str(tok_path), "--out_dir", str(work / "x1"))
    rss_n, t_n, _ = timed(lambda: peak_rss_mb("--tokenizer", str(tok_path), "--corpus", str(big),
                                              "--out_dir", str(work / f"x{scale}")))
    print(f"Peak RSS of python 01_tokenizer/prepare.py (imports alone: {rss_imports:.0f} MB)")
    print(f"  default corpus  ({mb:5.1f} MB)  {rss_1:5.0f} MB")
    print(f"  {scale}x the corpus   ({mb * scale:5.1f} MB)  {rss_n:5.0f} MB   "
          f"({mb * scale / t_n:.2f} MB/s end to end, process start included)")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Benchmarks of lesson 01: BPE training and token-file preparation.")
    parser.add_argument("--only", choices=["bpe", "plain", "prepare"], help="run one benchmark (default: all)")
    parser.add_argument("--vocab_size", "--vocab-size", type=int, default=tokenizer_lib.DEFAULT_VOCAB_SIZE,
                        help="vocab size for bpe and prepare (default 8192)")
    parser.add_argument("--plain_chars", "--plain-chars", type=int, default=200_000,
                        help="corpus size for plain (default 200000)")
    parser.add_argument("--plain_vocab_size", "--plain-vocab-size", type=int, default=1024,
                        help="vocab size for plain (default 1024)")
    parser.add_argument("--scale", type=int, default=4, help="the larger corpus is this many copies of the default one")
    parser.add_argument("--parquet_scale", "--parquet-scale", type=int, default=12,
                        help="the parquet corpus prepared by a pool of processes is this many copies (default 12)")
    parser.add_argument("--workers", type=int, default=None, help="prepare's processes at scale (default: one per core)")
    args = parser.parse_args(argv)

    docs = list(corpus.documents("shakespeare"))
    if args.only in (None, "bpe"):
        bench_bpe(docs, args.vocab_size)
    if args.only in (None, "plain"):
        bench_plain(docs, args.plain_chars, args.plain_vocab_size)
    if args.only in (None, "prepare"):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            tokenizer_lib.save_tokenizer(tokenizer_lib.train_tokenizer(docs, args.vocab_size), work / "tokenizer.json")
            bench_prepare(docs, work / "tokenizer.json", work, args.scale, args.parquet_scale, args.workers)


if __name__ == "__main__":
    commands.exit_on_data_error(main)
