"""The shard runner of prepare.py: a corpus cut into shards (corpus.shards), each tokenized into its own two files
by a pool of processes, a manifest of the finished ones so that a rerun redoes only the others, a lock so that one
job writes a directory at a time.

    OUT_DIR/shards/manifest.json    the job (corpus, its shards, the tokenizer's sha256), the shards done
    OUT_DIR/shards/00042.bin        shard 42's ids, every document followed by </s>
    OUT_DIR/shards/00042.docs.npy   one row per document: crc32 of its UTF-8 bytes, its token count

Why shards, and what each file guarantees: notes.md, "At scale". prepare.py splits and concatenates them.
"""

import fcntl
import json
import multiprocessing
import os
import signal
import sys
import time
import zlib
from array import array
from contextlib import contextmanager
from importlib import import_module
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
commands = import_module("01_tokenizer.commands")
corpus = import_module("01_tokenizer.corpus")
tokenizer_lib = import_module("01_tokenizer.tokenizer")

DTYPE = np.dtype(np.uint16)  # the ids as written
BATCH_CHARS = 1 << 20  # ~1 MB of text per encode call: all cores busy, ~150 MB peak RSS (4 MB: ~360 MB, no faster)


def shard_path(shard_dir, index: int, suffix: str) -> Path:
    return Path(shard_dir) / f"{index:05d}{suffix}"  # 00042.bin: ids; 00042.docs.npy: (documents, 2) crc32, tokens


_progress = None  # set per process: called with (documents, characters) after every batch


def encode_shard(task: dict) -> dict:
    """Tokenize one shard into its two files, each written under a temporary name; return its counts."""
    tok = tokenizer_lib.load_tokenizer(task["tokenizer_path"])  # per shard: milliseconds, never a stale one
    rows, chars = 0, 0
    crcs, counts = array("I"), array("I")  # per document: crc32, tokens with </s> (4 bytes each)
    with commands.atomic_write(shard_path(task["shard_dir"], task["index"], ".bin")) as tmp, open(tmp, "wb") as out:
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
                _progress(len(batch), size)
                chars += size
                batch, size = [], 0
    docs = np.stack([np.frombuffer(crcs, np.uint32), np.frombuffer(counts, np.uint32)], axis=1)  # (documents, 2)
    with commands.atomic_write(shard_path(task["shard_dir"], task["index"], ".docs.npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, docs)
    return {"index": task["index"], "rows": rows, "docs": len(docs), "tokens": int(docs[:, 1].sum()), "chars": chars,
            "stamp": task["stamp"]}


def _init_worker(counters):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallel across processes, one thread each
    os.environ["USE_TORCH"] = "0"  # else datasets imports torch (~1 s a worker) to know its tensors: text only here
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process' to handle
    global _progress

    def progress(docs: int, chars: int):
        with counters.get_lock():
            counters[0] += docs
            counters[1] += chars

    _progress = progress


# ---------------------------------------------------------------- the shards of a job: a manifest, a pool, a lock

def cpu_count() -> int:
    """The cores this process may use (os.sched_getaffinity where there is one: Linux; containers limit it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def file_stamp(shard: dict) -> list | None:
    """[bytes, mtime_ns] of a shard's local file (None for the hub): an edited file's shard is redone."""
    files = shard.get("load", {}).get("data_files", [shard.get("path")])
    path = files[0] if isinstance(files, list) else None
    return [os.stat(path).st_size, os.stat(path).st_mtime_ns] if path and Path(path).exists() else None


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
            and shard_path(shard_dir, i, ".bin").stat().st_size == c["tokens"] * DTYPE.itemsize}


def tokenize_shards(shard_list: list[dict], job: dict, shard_dir: Path, task: dict, workers: int | None,
                    total: int | None, progress: bool) -> dict:
    """encode_shard every shard not done yet, on `workers` spawned processes (in this one when 1), recording
    each in the manifest as it finishes; return {index: counts} of all. A worker's error is raised here."""
    global _progress
    stamps = [file_stamp(shard) for shard in shard_list]
    done = load_manifest(shard_dir, job, stamps)  # what an interrupted run of this very job finished
    todo = [{**task, "index": i, "shard": shard_list[i], "stamp": stamps[i]}
            for i in range(len(shard_list)) if i not in done]
    workers = min(workers or cpu_count(), max(len(todo), 1))
    if done and progress:
        print(f"resuming: {len(done)} of {len(shard_list)} shards were already tokenized in {shard_dir}")
    bar = tqdm(desc=f"tokenizing {job['corpus']}", unit="doc", unit_scale=True, total=total, disable=not progress)
    start, chars = time.perf_counter(), [0]

    def on_progress(docs: int, size: int):
        chars[0] += size
        bar.update(docs)
        bar.set_postfix_str(f"{len(done)}/{len(shard_list)} shards, {workers} workers, "
                            f"{chars[0] / (time.perf_counter() - start) / 1e6:.2f} MB/s", refresh=False)

    def on_done(result: dict):  # the shard's files are in place: only now may the manifest list it
        done[result.pop("index")] = result
        with commands.atomic_write(shard_dir / "manifest.json") as tmp:
            tmp.write_text(json.dumps({"job": job, "done": {str(i): done[i] for i in sorted(done)}}, indent=1))
        on_progress(0, 0)

    with bar:
        if workers == 1:
            _progress = on_progress
            for one in todo:
                on_done(encode_shard(one))
            return done
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked Rust thread pools or locks
        counters = ctx.Array("q", 2)  # shared memory: documents and characters done by all workers
        reported = [0, 0]
        try:
            with ctx.Pool(workers, initializer=_init_worker, initargs=(counters,)) as pool:
                pending = [pool.apply_async(encode_shard, (one,)) for one in todo]
                while pending:
                    pending[0].wait(timeout=0.2)
                    now = counters[:]
                    on_progress(now[0] - reported[0], now[1] - reported[1])
                    reported = now
                    for result in [r for r in pending if r.ready()]:
                        pending.remove(result)
                        on_done(result.get())  # re-raises the worker's exception
                pool.close()  # all done: let the workers exit (leaving the block on an error kills them)
                pool.join()
        finally:  # leaving the Pool block terminated the workers: remove what they were writing
            for tmp in shard_dir.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
    return done


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
