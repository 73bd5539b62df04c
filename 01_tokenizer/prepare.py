"""Token files: a corpus, tokenized once, as flat uint16 arrays the trainer memory-maps.

    OUT_DIR/train.bin   ids of the train documents, each followed by </s> (EOT_ID = 2)
    OUT_DIR/val.bin     the same for the validation documents
    OUT_DIR/meta.json   vocab_size, dtype, token and document counts, the tokenizer's sha256, corpus, split rule

    split(doc) = "val" if crc32(utf8(doc)) < T else "train"
    T = min(ceil(val_fraction * 2**32), the crc32 at which val, filled in crc32 order, reaches val_tokens)

The split hangs on the document's own bytes: the same on every run and machine, and a document that
occurs twice lands on one side only. At scale a pool of processes encodes whole shards (shards.py)
into OUT_DIR/shards/, a manifest records the finished ones so that a rerun redoes only the others,
and the shards are concatenated in corpus order: the files are the same for any number of workers.
Every file appears complete or not at all (notes.md §7). Left out on purpose: shuffling, deduplication.

Demo (writes data/shakespeare/, training data/tokenizer.json first if missing): python 01_tokenizer/prepare.py
"""

import argparse
import json
import shutil
import sys
import time
import zlib
from importlib import import_module
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
commands = import_module("01_tokenizer.commands")
corpus = import_module("01_tokenizer.corpus")
tokenizer_lib = import_module("01_tokenizer.tokenizer")
shards = import_module("01_tokenizer.shards")  # the pool, the manifest, the lock

DataError = commands.DataError  # what load_meta and ensure_data raise; callers catch prepare.DataError
DTYPE = shards.DTYPE  # uint16: any id of a vocab of at most 65,536
DEFAULT_DATA_DIR = "data/shakespeare"
DEFAULT_VAL_FRACTION = 0.05  # 36 of the default corpus' 790 scenes
DEFAULT_VAL_TOKENS = 10_000_000  # ...but at most ~10 M tokens: 0.1% of OpenWebText
COPY_TOKENS = 1 << 24  # concatenate in 32 MB pieces: memory stays flat whatever the shard size
META_KEYS = ("vocab_size", "dtype", "train_tokens", "val_tokens", "train_docs", "val_docs",
             "tokenizer_sha256", "corpus", "split_rule", "eot_id")


def is_val(doc: str, val_fraction: float) -> bool:
    """The split rule without a token cap: val when the crc32 falls in the first val_fraction of 2**32."""
    return zlib.crc32(doc.encode("utf-8")) < val_fraction * 2**32


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
        docs = np.load(shards.shard_path(shard_dir, i, ".docs.npy"))
        if len(docs) == 0:
            continue
        tokens = np.memmap(shards.shard_path(shard_dir, i, ".bin"), dtype=DTYPE, mode="r")
        ends = np.cumsum(docs[:, 1], dtype=np.int64)
        is_val = docs[:, 0] < threshold
        cuts = np.flatnonzero(is_val[1:] != is_val[:-1]) + 1  # where a run of one side ends
        for first, last in zip(np.r_[0, cuts], np.r_[cuts, len(docs)]):
            start, end = ends[first] - docs[first, 1], ends[last - 1]
            for piece in range(start, end, COPY_TOKENS):
                tokens[piece : min(end, piece + COPY_TOKENS)].tofile(files["val" if is_val[first] else "train"])
        del tokens  # closes the memory map


# ---------------------------------------------------------------- the whole job

def prepare(corpus_spec="shakespeare", tokenizer_path=tokenizer_lib.DEFAULT_TOKENIZER_PATH, out_dir=DEFAULT_DATA_DIR,
            val_fraction: float = DEFAULT_VAL_FRACTION, cache_dir=corpus.DEFAULT_CACHE_DIR,
            batch_chars: int = shards.BATCH_CHARS, progress: bool = True, val_tokens: int = DEFAULT_VAL_TOKENS,
            workers: int | None = None) -> dict:
    """Tokenize a corpus into out_dir/{train,val}.bin and meta.json; return the meta dict. workers: as --workers
    (1: this process, the library's threads on all cores); the files are the same for any number."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}; fix: pass e.g. --val_fraction 0.05")
    if val_tokens < 0:
        raise DataError(f"val_tokens must be 0 (no cap) or more, got {val_tokens}; fix: pass e.g. --val_tokens 10000000")
    tok = tokenizer_lib.load_tokenizer(tokenizer_path)
    tok_sha = tokenizer_lib.tokenizer_sha256(tokenizer_path)  # of the file as loaded, before the long run
    vocab_size = tok.get_vocab_size()
    if vocab_size > np.iinfo(DTYPE).max + 1:
        raise DataError(f"{tokenizer_path} has {vocab_size} tokens, more than the {np.iinfo(DTYPE).max + 1} ids that "
                        f"uint16 token files hold; fix: retrain it with --vocab_size 65536 or less")
    if tok.token_to_id("</s>") != tokenizer_lib.EOT_ID:
        raise DataError(f"{tokenizer_path} does not have </s> at id {tokenizer_lib.EOT_ID}; "
                        f"fix: use a tokenizer trained by python 01_tokenizer/tokenizer.py")
    out_dir, described = Path(out_dir), corpus.describe(corpus_spec)
    specs = [corpus_spec] if isinstance(corpus_spec, str) else list(corpus_spec)
    expected = {name: corpus.HUB_CORPORA[name][1] for name in specs if name in corpus.HUB_CORPORA}
    shard_list, shard_dir = corpus.shards(corpus_spec), out_dir / "shards"
    job = {"corpus": described, "shards": shard_list, "tokenizer_sha256": tok_sha}
    task = {"tokenizer_path": str(tokenizer_path), "cache_dir": str(cache_dir), "shard_dir": str(shard_dir),
            "batch_chars": batch_chars}

    with shards.locked(shard_dir / "lock", f"another prepare.py writing {out_dir}"):  # it would mix shards
        # 1. every shard into its own files, by a pool of processes; resumes an interrupted run
        total = sum(expected.values()) if len(expected) == len(specs) else None  # known: the bar has an ETA
        done = shards.tokenize_shards(shard_list, job, shard_dir, task, workers, total, progress)
        # 2. a partial or changed copy of a named corpus must not train silently
        for name, count in expected.items():
            rows = sum(done[i]["rows"] for i, shard in enumerate(shard_list) if shard["spec"] == name)
            if rows != count:
                raise DataError(f"{name} gave {rows:,} documents, not the {count:,} of the complete corpus: the copy at "
                                f"{corpus.HUB_CORPORA[name][0]} is partial or has changed; fix: point "
                                f"corpus.HUB_CORPORA[{name!r}] at a complete copy, or pass the files you have as "
                                f"--corpus 'parquet:GLOB' (no count check)")
        if sum(d["docs"] for d in done.values()) == 0:
            raise DataError(f"the corpus {described!r} has no text (no non-empty document); "
                            f"fix: point --corpus at files with text")
        # 3. the split: one crc32 threshold for the whole corpus, from every document's crc32 and length
        docs = np.concatenate([np.load(shards.shard_path(shard_dir, i, ".docs.npy")) for i in range(len(shard_list))])
        threshold = val_threshold(docs, val_fraction, val_tokens)
        val = docs[:, 0] < threshold
        n_docs = {"train": int((~val).sum()), "val": int(val.sum())}
        n_tokens = {"train": int(docs[~val, 1].sum()), "val": int(docs[val, 1].sum())}
        if empty := [side for side, n in n_docs.items() if n == 0]:
            raise DataError(f"the {empty[0]} split is empty ({len(docs)} documents, val_fraction {val_fraction}, "
                            f"val_tokens {val_tokens}); fix: use a corpus with more documents or change --val_fraction")
        # 4. the shards, in corpus order, into train.bin and val.bin
        with commands.atomic_write(out_dir / "train.bin") as train_tmp, commands.atomic_write(out_dir / "val.bin") as val_tmp:
            with open(train_tmp, "wb") as train_file, open(val_tmp, "wb") as val_file:
                concatenate(shard_dir, len(shard_list), threshold, {"train": train_file, "val": val_file})
            # Leaving this block renames both files into place. Drop the old meta first, so that a crash
            # between the renames leaves no meta.json describing files it does not match.
            (out_dir / "meta.json").unlink(missing_ok=True)
        meta = {
            "vocab_size": vocab_size, "dtype": DTYPE.name,
            "train_tokens": n_tokens["train"], "val_tokens": n_tokens["val"],
            "train_docs": n_docs["train"], "val_docs": n_docs["val"],
            "chars": sum(d["chars"] for d in done.values()),
            "tokenizer_sha256": tok_sha,
            "corpus": described,
            "split_rule": f"val if zlib.crc32(doc.encode('utf-8')) < {threshold} else train",
            "val_threshold": threshold,  # is_val(doc, val_fraction) only when val_tokens_cap did not bind
            "val_fraction": val_fraction, "val_tokens_cap": val_tokens,
            "eot_id": tokenizer_lib.EOT_ID, "eot_rule": "every document is followed by </s>",
            "shards": len(shard_list),
        }
        with commands.atomic_write(out_dir / "meta.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=2))
        shutil.rmtree(shard_dir)  # done: the shards are in the two files now
    return meta


def load_meta(data_dir=DEFAULT_DATA_DIR) -> dict:
    """meta.json, checked against the token files beside it; DataError for anything missing or inconsistent."""
    data_dir = Path(data_dir)
    fix = f"fix: rerun python 01_tokenizer/prepare.py --out_dir {data_dir}"
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
    except FileNotFoundError:
        raise DataError(f"no token files in {data_dir} (meta.json is missing); {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{data_dir / 'meta.json'} is not valid JSON; {fix}") from None
    missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise DataError(f"{data_dir / 'meta.json'} lacks {', '.join(missing)}; {fix}")
    if meta["dtype"] != DTYPE.name:
        raise DataError(f"{data_dir / 'meta.json'} says dtype {meta['dtype']}, this code reads {DTYPE.name}; {fix}")
    for split in ("train", "val"):
        path, n_tokens = data_dir / f"{split}.bin", meta[f"{split}_tokens"]
        size = path.stat().st_size if path.exists() else None
        if size != n_tokens * DTYPE.itemsize:
            found = "it is missing" if size is None else f"it has {size:,} bytes"
            raise DataError(f"{path} should hold {n_tokens:,} tokens ({n_tokens * DTYPE.itemsize:,} bytes) "
                            f"but {found}; {fix}")
    return meta


def check_tokenizer(meta: dict, tokenizer_path, data_dir) -> None:
    """DataError unless the token files were made by this very tokenizer.json (same sha256)."""
    sha = tokenizer_lib.tokenizer_sha256(tokenizer_path)
    if sha != meta["tokenizer_sha256"]:
        raise DataError(f"the token files in {data_dir} were made by another tokenizer (sha256 "
                        f"{meta['tokenizer_sha256'][:12]}, {tokenizer_path} is {sha[:12]}); fix: rerun "
                        f"python 01_tokenizer/prepare.py --out_dir {data_dir} --tokenizer {tokenizer_path}")


def ensure_data(data_dir=DEFAULT_DATA_DIR, tokenizer_path=tokenizer_lib.DEFAULT_TOKENIZER_PATH, corpus_spec="shakespeare",
                vocab_size: int = tokenizer_lib.DEFAULT_VOCAB_SIZE, cache_dir=corpus.DEFAULT_CACHE_DIR,
                val_fraction: float = DEFAULT_VAL_FRACTION, val_tokens: int = DEFAULT_VAL_TOKENS,
                workers: int | None = None) -> dict:
    """What the trainer calls (under torchrun: on rank 0, then a barrier): make the tokenizer and token files if
    missing, check that they belong together, to this corpus and vocab size; return meta. Never overwrites."""
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.exists():
        tokenizer_lib.train(corpus_spec, vocab_size, tokenizer_path, cache_dir)
    tok_vocab = tokenizer_lib.load_tokenizer(tokenizer_path).get_vocab_size()
    if tok_vocab != vocab_size:
        raise DataError(f"{tokenizer_path} has {tok_vocab} tokens, not the {vocab_size} asked for; fix: ask for "
                        f"vocab_size={tok_vocab}, or retrain it with python 01_tokenizer/tokenizer.py "
                        f"--vocab_size {vocab_size} --out {tokenizer_path}")
    if not (Path(data_dir) / "meta.json").exists():
        prepare(corpus_spec, tokenizer_path, data_dir, val_fraction, cache_dir, val_tokens=val_tokens, workers=workers)
    meta = load_meta(data_dir)
    check_tokenizer(meta, tokenizer_path, data_dir)
    described = corpus.describe(corpus_spec)
    if meta["corpus"] != described:
        raise DataError(f"{data_dir} holds the corpus {meta['corpus']!r}, not {described!r}; fix: pick another "
                        f"data_dir, or rerun python 01_tokenizer/prepare.py --corpus {described} --out_dir {data_dir}")
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description="Tokenize a corpus into uint16 train.bin / val.bin and meta.json.")
    corpus.add_corpus_flags(parser)
    parser.add_argument("--tokenizer", default=tokenizer_lib.DEFAULT_TOKENIZER_PATH,
                        help="tokenizer.json to encode with (trained on --corpus first if missing)")
    parser.add_argument("--vocab_size", "--vocab-size", type=int, default=tokenizer_lib.DEFAULT_VOCAB_SIZE,
                        help="only used when the tokenizer must be trained first")
    parser.add_argument("--out_dir", "--out-dir", default=DEFAULT_DATA_DIR,
                        help="directory for train.bin, val.bin, meta.json")
    parser.add_argument("--val_fraction", "--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="share of documents in val.bin, chosen by hash (default 0.05)")
    parser.add_argument("--val_tokens", "--val-tokens", type=int, default=DEFAULT_VAL_TOKENS,
                        help="...but val.bin holds at most about this many tokens (default 10,000,000; 0: no cap)")
    parser.add_argument("--workers", type=int,
                        help="processes encoding shards (default: one per core, at most one per shard)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing: check the token files in --out_dir against meta.json and --tokenizer")
    args = parser.parse_args(argv)

    if args.check:
        meta = load_meta(args.out_dir)
        check_tokenizer(meta, args.tokenizer, args.out_dir)
        print(f"ok: {args.out_dir} holds {meta['train_tokens']:,} + {meta['val_tokens']:,} tokens of "
              f"{meta['corpus']!r}, made by {args.tokenizer}")
        return
    if not Path(args.tokenizer).exists():
        print(f"{args.tokenizer} is missing: training it on {corpus.describe(args.corpus)} first")
        tokenizer_lib.train(args.corpus, args.vocab_size, args.tokenizer, args.cache_dir, show_progress=True)
    start = time.perf_counter()
    meta = prepare(args.corpus, args.tokenizer, args.out_dir, args.val_fraction, args.cache_dir,
                   val_tokens=args.val_tokens, workers=args.workers)
    seconds = time.perf_counter() - start
    n_tokens = meta["train_tokens"] + meta["val_tokens"]
    print(f"{meta['train_docs']:,} train / {meta['val_docs']:,} val documents -> {meta['train_tokens']:,} / "
          f"{meta['val_tokens']:,} tokens in {seconds:.1f} s ({meta['chars'] / n_tokens:.2f} characters per token, "
          f"{meta['chars'] / seconds / 1e6:.2f} M characters/s)")
    val = np.memmap(Path(args.out_dir) / "val.bin", dtype=DTYPE, mode="r")
    first_doc = val[: int(np.argmax(val == tokenizer_lib.EOT_ID)) + 1]
    text = tokenizer_lib.load_tokenizer(args.tokenizer).decode(first_doc.tolist(), skip_special_tokens=False)
    print(f"val.bin starts with a {len(first_doc)}-token document: {text[:70]!r}...")
    assert text.endswith("</s>") and load_meta(args.out_dir) == meta, "the first document must end in </s>"
    print(f"checked: meta.json matches the files in {args.out_dir}, and its first document decodes and ends with </s>")


if __name__ == "__main__":
    commands.exit_on_data_error(main)
