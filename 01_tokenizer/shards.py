"""The plumbing of prepare.py at scale: shards tokenized by a pool of processes, a manifest, one concatenation.

    OUT_DIR/shards/manifest.json    the job (corpus, its shards, the tokenizer's sha256), the shards done
    OUT_DIR/shards/00042.bin        shard 42's ids, every document followed by </s> (uint16)
    OUT_DIR/shards/00042.docs.npy   one row per document: crc32 of its UTF-8 bytes, its token count (uint32)

A worker encodes whole shards (a file, or one data file of a hub dataset) into their own files,
written under temporary names and renamed when complete; the main process then records the shard
in the manifest. A restart of the same job skips the shards the manifest lists and redoes the rest.
When all are done, `concatenate` copies every document into train.bin or val.bin, in corpus order,
so the result is the same for any number of workers.

Left out on purpose: splitting one data file between workers (datasets' row-group `reshard` is
too new to rely on), retrying a failed download (a rerun resumes).
"""

import fcntl
import json
import multiprocessing
import os
import signal
import sys
import zlib
from array import array
from contextlib import contextmanager
from importlib import import_module
from itertools import chain
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
corpus = import_module("01_tokenizer.corpus")
tokenizer_lib = import_module("01_tokenizer.tokenizer")

DTYPE = np.uint16
COPY_TOKENS = 1 << 24  # concatenate in 32 MB pieces: memory stays flat whatever the shard size
_report = None  # set per process: called with (task, documents, characters) after every batch


def cpu_count() -> int:
    """The cores this process may use (os.sched_getaffinity where there is one: Linux; containers limit it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def shard_path(shard_dir, index: int, suffix: str) -> Path:
    return Path(shard_dir) / f"{index:05d}{suffix}"


def encode_shard(task: dict) -> dict:
    """Tokenize one shard into its two files; return its counts. Runs in a worker (or in-process)."""
    tok = tokenizer_lib.load_tokenizer(task["tokenizer_path"])  # per shard: milliseconds, never a stale one
    rows, chars = 0, 0
    crcs, counts = array("I"), array("I")  # per document: crc32, tokens with </s> (4 bytes each)
    with corpus.atomic_write(shard_path(task["shard_dir"], task["index"], ".bin")) as tmp, open(tmp, "wb") as out:
        batch, size = [], 0
        for doc in chain(corpus.shard_documents(task["shard"], task["cache_dir"]), [None]):  # None: the end
            if doc is not None:
                rows += 1
                if doc.strip():
                    batch.append(doc)
                    size += len(doc)
                if size < task["batch_chars"]:
                    continue
            if batch:
                encodings = tok.encode_batch_fast(batch, add_special_tokens=False)  # Rust; all cores in-process
                ids = [e.ids + [tokenizer_lib.EOT_ID] for e in encodings]
                np.fromiter(chain.from_iterable(ids), dtype=DTYPE, count=sum(map(len, ids))).tofile(out)
                crcs.extend(zlib.crc32(d.encode("utf-8")) for d in batch)
                counts.extend(map(len, ids))
                if _report:
                    _report(task, len(batch), size)
                chars += size
                batch, size = [], 0
    docs = np.stack([np.frombuffer(crcs, np.uint32), np.frombuffer(counts, np.uint32)], axis=1)  # (documents, 2)
    with corpus.atomic_write(shard_path(task["shard_dir"], task["index"], ".docs.npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, docs)
    return {"index": task["index"], "rows": rows, "docs": len(docs), "tokens": int(docs[:, 1].sum()), "chars": chars,
            "stamp": task["stamp"]}


def _init_worker(counters):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallel across processes, one thread each
    os.environ["USE_TORCH"] = "0"  # else datasets imports torch (~1 s a worker) to know its tensors: text only here
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process' to handle
    global _report

    def report(task: dict, docs: int, chars: int):  # each task its own two counters: no lock needed
        counters[2 * task["slot"]] += docs
        counters[2 * task["slot"] + 1] += chars

    _report = report


def run(tasks: list[dict], workers: int, on_progress, on_done) -> None:
    """encode_shard every task, on `workers` processes (in this one when 1), in order; on_done(result)
    as each finishes, on_progress(docs, chars) as batches go by. A worker's error is raised here."""
    global _report
    if workers <= 1:
        _report = lambda task, docs, chars: on_progress(docs, chars)  # noqa: E731
        for task in tasks:
            on_done(encode_shard(task))
        return
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked Rust thread pools or locks
    counters = ctx.RawArray("q", 2 * len(tasks))  # shared memory: documents and characters done, per task
    reported = [0, 0]
    try:
        with ctx.Pool(workers, initializer=_init_worker, initargs=(counters,)) as pool:
            pending = [pool.apply_async(encode_shard, ({**task, "slot": slot},)) for slot, task in enumerate(tasks)]
            while pending:
                pending[0].wait(timeout=0.2)
                now = [sum(counters[0::2]), sum(counters[1::2])]
                on_progress(now[0] - reported[0], now[1] - reported[1])
                reported = now
                for result in [r for r in pending if r.ready()]:
                    pending.remove(result)
                    on_done(result.get())  # re-raises the worker's exception
            pool.close()  # all done: let the workers exit (leaving the block on an error kills them)
            pool.join()
    finally:  # leaving the Pool block terminated the workers: remove what they were writing
        for tmp in Path(tasks[0]["shard_dir"]).glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


@contextmanager
def locked(lock_path, holder: str):
    """An exclusive flock on lock_path while the block runs; a process that finds it held says that it waits for
    `holder`, then waits. The lock goes with the file descriptor, also when its process is killed: never stale."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {holder}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def load_manifest(shard_dir, job: dict, stamps: list) -> dict:
    """{index: counts} of the shards already done for this very job (corpus, shards, tokenizer) whose
    input file is unchanged (stamps[index]). Files of another job and half-written files are deleted."""
    path = Path(shard_dir) / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    if manifest.get("job") != job:
        for stale in Path(shard_dir).glob("[0-9]*"):
            stale.unlink()
        manifest = {}
    for tmp in Path(shard_dir).glob(".*.tmp"):  # left by a killed worker
        tmp.unlink()
    done = {int(i): counts for i, counts in manifest.get("done", {}).items()}
    return {i: c for i, c in done.items() if c["stamp"] == stamps[i]  # and both files there, the ids of the right size
            and shard_path(shard_dir, i, ".docs.npy").is_file() and shard_path(shard_dir, i, ".bin").is_file()
            and shard_path(shard_dir, i, ".bin").stat().st_size == c["tokens"] * np.dtype(DTYPE).itemsize}


def save_manifest(shard_dir, job: dict, done: dict) -> None:
    with corpus.atomic_write(Path(shard_dir) / "manifest.json") as tmp:
        tmp.write_text(json.dumps({"job": job, "done": {str(i): done[i] for i in sorted(done)}}, indent=1))


def val_threshold(docs: np.ndarray, val_fraction: float, val_tokens: int) -> int:
    """T in `val if crc32 < T`: the first val_fraction of crc32 space, cut further so that val holds
    just over val_tokens (0: no cap). docs: (n, 2) crc32 and token count. Equal crc32s stay together."""
    threshold = int(np.ceil(val_fraction * 2**32))  # crc < ceil(f * 2**32)  <=>  crc < f * 2**32, as is_val
    if val_tokens and len(docs):
        order = np.argsort(docs[:, 0], kind="stable")
        cumulative = np.cumsum(docs[order, 1], dtype=np.int64)
        k = int(np.searchsorted(cumulative, val_tokens))  # first document where val reaches val_tokens
        if k < len(docs):
            threshold = min(threshold, int(docs[order[k], 0]) + 1)
    return threshold


def concatenate(shard_dir, count: int, threshold: int, files: dict) -> None:
    """Append every document of shards 0..count-1 to files["val"] if its crc32 < threshold, else to
    files["train"], in order; runs of neighbouring documents on one side are copied in one go."""
    for i in range(count):
        docs = np.load(shard_path(shard_dir, i, ".docs.npy"))
        if len(docs) == 0:
            continue
        tokens = np.memmap(shard_path(shard_dir, i, ".bin"), dtype=DTYPE, mode="r")
        ends = np.cumsum(docs[:, 1], dtype=np.int64)
        is_val = docs[:, 0] < threshold
        cuts = np.flatnonzero(is_val[1:] != is_val[:-1]) + 1  # where a run of one side ends
        for first, last in zip(np.r_[0, cuts], np.r_[cuts, len(docs)]):
            start, end = ends[first] - docs[first, 1], ends[last - 1]
            for piece in range(start, end, COPY_TOKENS):
                tokens[piece : min(end, piece + COPY_TOKENS)].tofile(files["val" if is_val[first] else "train"])
        del tokens  # closes the memory map
