"""What SFT trains on: conversations, read and checked, cut to the window by whole turns, packed into rows.

    conversation -> ChatFormat.encode_turns -> fit_turns (<= max_seq_len) -> pack (rows <= max_seq_len) -> sft.collate

Conversations are {"messages": [{"role", "content"}, ...]}: JSONL lines, a Hugging Face dataset's "messages"
column, or the offline instruction set built here from the plays, whose speeches name their speakers:

    speaker    user: "Who says this?\\n<a line>"          assistant: "<the speaker>"
    continue   user: "Continue this speech:\\n<a line>"   assistant: "<the next line>"
    both       the two as one conversation of two exchanges (multi-turn), sometimes under a system message

Validation conversations come from scenes the base model was not pretrained on (lesson 01's split). Every
problem a user can fix is a one-line DataError naming the file and line.
Left out on purpose: document masking inside packed rows, dataset mixing weights, dedup (notes.md).

Demo (writes data/sft/{train,val}.jsonl, packs them): python 08_sft/data.py
"""

import json
import random
import re
import sys
from importlib import import_module
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
commands = import_module("01_tokenizer.commands")
corpus = import_module("01_tokenizer.corpus")
prepare = import_module("01_tokenizer.prepare")
template = import_module("08_sft.template")

DataError = commands.DataError
DEFAULT_DIR = "data/sft"
# A speech is a block: the speaker's label on its own line ("KING HENRY.", "Ham.", "LYSANDER"), then its lines.
SPEAKER = re.compile(r"(?:[A-Z][A-Za-z'-]*\.? ?){1,3}")
SYSTEM = "You answer questions about Shakespeare's plays in one line."


# ---- the offline instruction set --------------------------------------------------------------------------

def speeches(doc: str) -> list:
    """[(speaker, [line, ...]), ...] of one scene, in order; stage directions ([Exit.]) dropped."""
    out = []
    for block in re.split(r"\n\s*\n", doc.strip()):
        label, *lines = [line.strip() for line in block.splitlines() if line.strip()] or [""]
        lines = [line for line in lines if not line.startswith("[")]
        if lines and SPEAKER.fullmatch(label) and not label.startswith(("ACT", "Act", "SCENE", "Scene")):
            name = label.rstrip(".")
            out.append((name.title() if name.isupper() else name, lines))
    return out


def conversations(doc: str, rng: random.Random) -> list:
    """One conversation per speech of at least two lines, of a kind drawn by `rng`; none from a document without
    an ACT/SCENE heading (a cast list or a poem, whose label-like lines are not speeches)."""
    if not corpus.HEADING.match(doc):
        return []
    out = []
    for speaker, lines in speeches(doc):
        if len(lines) < 2:
            continue
        who = [{"role": "user", "content": f"Who says this?\n{lines[0]}"}, {"role": "assistant", "content": speaker}]
        cont = [{"role": "user", "content": f"Continue this speech:\n{lines[0]}"}, {"role": "assistant", "content": lines[1]}]
        kind = rng.random()
        if kind < 0.4:
            messages = who
        elif kind < 0.8:
            messages = cont
        else:  # two exchanges: the second question refers to the first ("it"), so the history matters
            system = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
            messages = system + who + [{"role": "user", "content": "And how does it go on?"}, cont[1]]
        out.append({"messages": messages})
    return out


def write_splits(rows: dict, out_dir, what: str, corpus_spec) -> dict:
    """rows {"train": [...], "val": [...]} as out_dir/{train,val}.jsonl (atomically); the counts. Lessons 10, 11 too."""
    if not rows["train"] or not rows["val"]:
        raise DataError(f"{corpus_spec} gave {len(rows['train'])} train and {len(rows['val'])} val {what}s; "
                        "fix: use a corpus of plays (speaker label on its own line, then the speech)")
    for name, items in rows.items():
        with commands.atomic_write(Path(out_dir) / f"{name}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(x) + "\n" for x in items))
    return {name: len(items) for name, items in rows.items()}


def build(corpus_spec="shakespeare", out_dir=DEFAULT_DIR, cache_dir=corpus.DEFAULT_CACHE_DIR, seed: int = 0) -> dict:
    """Write the offline instruction set's train.jsonl and val.jsonl under out_dir; return the counts."""
    rng, rows = random.Random(seed), {"train": [], "val": []}
    for doc in corpus.documents(corpus_spec, cache_dir):  # lesson 01's rule and fraction: the same val scenes
        rows["val" if prepare.is_val(doc, prepare.DEFAULT_VAL_FRACTION) else "train"] += conversations(doc, rng)
    return write_splits(rows, out_dir, "conversation", corpus_spec)


def offline_set(data_dir: str, build, name: str, what: str) -> tuple:
    """(train, val) paths of an offline set in data_dir, built by build(out_dir=data_dir) from the default
    corpus when missing: this lesson's instruction set, lesson 10's preference pairs, lesson 11's task."""
    train, val = Path(data_dir) / "train.jsonl", Path(data_dir) / "val.jsonl"
    if not (train.is_file() and val.is_file()):
        counts = build(out_dir=data_dir)
        print(f"built the offline {name}: {counts['train']:,} train / {counts['val']:,} val {what}s in {data_dir}")
    return train, val


# ---- conversations in -------------------------------------------------------------------------------------

def jsonl_rows(path, what: str, example: str, omitted: str = "the offline set") -> list:
    """[(where, row)]: every non-blank line of a JSONL file, parsed, with "file:line" for the caller's checks;
    a one-line DataError for a missing file, a bad line or no row. Lessons 10 and 11 read through it too."""
    path, rows = Path(path), []
    if not path.is_file():
        raise DataError(f"no {what} file at {path}; fix: pass --data FILE.jsonl, or omit it for {omitted}")
    with open(path, "rb") as f:  # bytes, decoded line by line: a bad byte is reported on its own line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    rows.append((f"{path}:{lineno}", json.loads(line)))
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno} is not UTF-8 text; fix: save the file as UTF-8") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix: one JSON object per line") from None
    if not rows:
        raise DataError(f"{path} holds no {what}; fix: one {example} per line")
    return rows


def check_conversation(messages, where: str) -> list:
    """The messages of one conversation if SFT can learn from them; a one-line DataError otherwise."""
    try:
        template.check_messages(messages)
    except ValueError as e:
        raise DataError(f"{where}: {e}; fix: each line must be {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn; fix: end each conversation with the answer")
    return messages


def read_jsonl(path) -> list:
    """Every conversation of a JSONL file, checked; the first bad line is a DataError naming file and line."""
    convs = []
    for where, row in jsonl_rows(path, "conversation", '{"messages": [...]}'):
        if not isinstance(row, dict) or "messages" not in row:
            raise DataError(f"{where} has no \"messages\" key; fix: each line must be {{\"messages\": [...]}}")
        convs.append(check_conversation(row["messages"], where))
    return convs


def hub_rows(name: str, split: str, limit: int | None, check, column: str | None = None, **load_kwargs) -> list:
    """check(row, where) of each row (or one column) of a Hugging Face dataset, streamed with lesson 01's one-line
    hub errors ("json" + data_files= reads local files). Lesson 10 reads its pairs through it."""
    import datasets  # imported here: the offline set never pays for it

    out = []
    with corpus.hub_errors(name):
        for i, row in enumerate(datasets.load_dataset(name, split=split, streaming=True, **load_kwargs)):
            if limit is not None and i >= limit:
                break
            if column is not None and column not in row:
                raise DataError(f"{name!r} has no {column!r} column (it has {sorted(row)}); fix: use a dataset with one")
            out.append(check(row if column is None else row[column], f"{name} row {i}"))
    if not out:
        raise DataError(f"{name} split {split!r} holds no rows")
    return out


def hub_conversations(name: str, split: str = "train", limit: int | None = None, **load_kwargs) -> list:
    """The "messages" column of a Hugging Face dataset, checked row by row."""
    return hub_rows(name, split, limit, check_conversation, "messages", **load_kwargs)


def held_out(items: list, val_fraction: float, what: str) -> tuple:
    """(train, val): lesson 01's rule on each item's own text, so the same split on every run and rank."""
    is_val = [prepare.is_val(json.dumps(item, sort_keys=True), val_fraction) for item in items]
    train, val = [x for x, v in zip(items, is_val) if not v], [x for x, v in zip(items, is_val) if v]
    if not train or not val:
        raise DataError(f"{len(items)} {what}s give {len(train)} train and {len(val)} val; "
                        f"fix: more {what}s, another --val_fraction, or --val_data")
    return train, val


def train_val(cfg: dict, read, hub, default_data, what: str) -> tuple:
    """(train, val) lists of a stage's rows from --data JSONL files, a hub dataset, or the offline set in
    data_dir (its own val.jsonl); read(path), hub(name, split, limit), default_data(data_dir). Lesson 10 too."""
    if cfg["hf_dataset"]:
        rows, val_data = hub(cfg["hf_dataset"], cfg["hf_split"], cfg["hf_limit"] or None), cfg["val_data"]
    elif cfg["data"]:
        rows, val_data = [r for path in cfg["data"] for r in read(path)], cfg["val_data"]
    else:
        train_path, val_path = default_data(cfg["data_dir"])
        rows, val_data = read(train_path), [val_path]
    if val_data:
        return rows, [r for path in val_data for r in read(path)]
    return held_out(rows, cfg["val_fraction"], what)


def conversations_of(cfg: dict) -> tuple:
    """(train, val) conversations of an SFT run's data flags."""
    return train_val(cfg, read_jsonl, hub_conversations, lambda d: offline_set(d, build, "instruction set", "conversation"),
                     "conversation")


# ---- token rows out -----------------------------------------------------------------------------------------

def fit_turns(turns: list, bos_id: int, max_len: int) -> tuple | None:
    """(ids, mask) of the longest prefix of whole turns that ends with an assistant turn and has at most max_len
    tokens (BOS included); None when not even the first answer fits. Cutting inside a turn would teach an answer
    without its </s>, or a question without its answer."""
    ids, mask, best = [bos_id], [False], None
    for turn_ids, turn_mask in turns:
        if len(ids) + len(turn_ids) > max_len:
            break
        ids, mask = ids + turn_ids, mask + turn_mask
        if any(turn_mask):  # an assistant turn: a place where the conversation may end
            best = (ids, mask)
    return best


def encode_all(fmt, convs: list, max_len: int) -> tuple:
    """(examples [(ids, mask)], counts {kept, truncated, dropped}) for a list of conversations."""
    examples, counts = [], {"kept": 0, "truncated": 0, "dropped": 0}
    for messages in convs:
        turns = fmt.encode_turns(messages)
        fitted = fit_turns(turns, fmt.bos_id, max_len)
        if fitted is None:
            counts["dropped"] += 1
            continue
        counts["kept" if len(fitted[0]) == 1 + sum(len(t) for t, _ in turns) else "truncated"] += 1
        examples.append(fitted)
    return examples, counts


def pack(examples: list, max_len: int) -> list:
    """Whole examples, in order, concatenated into rows of at most max_len tokens, so that a batch is not mostly
    padding (the offline set averages 34 tokens a conversation, the window is 256). No example is split."""
    rows, ids, mask = [], [], []
    for ex_ids, ex_mask in examples:
        if ids and len(ids) + len(ex_ids) > max_len:
            rows.append((ids, mask))
            ids, mask = [], []
        ids, mask = ids + ex_ids, mask + ex_mask
    if ids:
        rows.append((ids, mask))
    return rows


if __name__ == "__main__":
    def demo():
        tokenizer_lib = import_module("01_tokenizer.tokenizer")
        fmt = template.ChatFormat(tokenizer_lib.load_tokenizer())
        train_path, _ = offline_set(DEFAULT_DIR, build, "instruction set", "conversation")
        convs = read_jsonl(train_path)
        for conv in convs[:3]:
            print(" | ".join(f"{m['role']}: {m['content']!r}" for m in conv))
        examples, counts = encode_all(fmt, convs, max_len=256)
        rows = pack(examples, 256)
        n_tokens, n_targets = sum(len(ids) for ids, _ in examples), sum(sum(m) for _, m in examples)
        print(f"{len(examples):,} conversations ({counts}), {n_tokens / len(examples):.0f} tokens each on average, "
              f"{100 * n_targets / n_tokens:.0f}% of them assistant tokens (trained); packed into {len(rows):,} rows "
              f"of <= 256 tokens, {n_tokens / len(rows):.0f} tokens per row")
        assert all(len(ids) <= 256 for ids, _ in rows) and all(c[-1]["role"] == "assistant" for c in convs)
        print("checked: every conversation ends with an answer, and no packed row crosses 256 tokens")

    commands.exit_on_data_error(demo)
