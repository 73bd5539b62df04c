"""What SFT trains on: conversations read and checked, cut to the model's window by whole turns, packed into rows.

    conversation -> ChatFormat.encode_turns -> fit_turns (<= max_seq_len) -> pack (rows <= max_seq_len) -> collate
    collate:  inputs = ids[:-1],  targets = ids[1:] where mask[1:] else IGNORE (-100)

Conversations are {"messages": [{"role", "content"}, ...]}, one per line of a JSONL file, or a Hugging
Face dataset's "messages" column (read through lesson 01's hub reader), or the offline instruction set
of instructions.py. Every problem a user can fix is a one-line DataError naming the file and line.

A conversation longer than max_seq_len keeps its longest prefix of whole turns that ends with an
assistant answer, or is dropped when even the first answer does not fit; cutting inside a turn would
teach an answer without its </s>, or a question without its answer. Both cases are counted.
Whole conversations are packed into rows of at most max_seq_len tokens, so a batch is not mostly
padding (the offline set averages 34 tokens a conversation, the window is 256); a batch's rows are padded to its longest
and the padding is masked like the user turns.

Left out on purpose: document masking inside packed rows (a conversation can attend to the ones packed
before it, as documents do in 07's windows; each starts with <s>), dataset mixing weights, dedup.

Demo: python 08_sft/chat_data.py   (packs the offline instruction set with lesson 01's tokenizer)
"""

import json
import sys
from importlib import import_module
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
corpus = import_module("01_tokenizer.corpus")
prepare = import_module("01_tokenizer.prepare")
tokenizer_lib = import_module("01_tokenizer.tokenizer")
template = import_module("08_sft.template")
instructions = import_module("08_sft.instructions")

DataError = corpus.DataError
IGNORE = -100  # the target of every position that is not an assistant token (the model's ignore_index)


# ---- conversations in ----------------------------------------------------------------------------------

def check_conversation(messages, where: str) -> list:
    """The messages of one conversation if SFT can learn from them; a one-line DataError otherwise."""
    try:
        template.check_messages(messages)
    except ValueError as e:
        raise DataError(f"{where}: {e}; fix: each line must be {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn; fix: end each conversation with the answer")
    return messages


def jsonl_rows(path, what: str, example: str, omitted: str = "the offline set") -> list:
    """[(where, row)]: every non-blank line of a JSONL file, parsed, with "file:line" for the caller's checks.
    A missing file, a line that is not JSON or not UTF-8, or a file with no row is a one-line DataError.
    Lessons 10 and 11 read their pairs and prompts through it too."""
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


def read_jsonl(path) -> list:
    """Every conversation of a JSONL file, checked; the first bad line is a DataError naming file and line."""
    convs = []
    for where, row in jsonl_rows(path, "conversation", '{"messages": [...]}'):
        if not isinstance(row, dict) or "messages" not in row:
            raise DataError(f"{where} has no \"messages\" key; fix: each line must be {{\"messages\": [...]}}")
        convs.append(check_conversation(row["messages"], where))
    return convs


def hub_conversations(name: str, split: str = "train", limit: int | None = None, **load_kwargs) -> list:
    """The "messages" column of a Hugging Face dataset, streamed through lesson 01's hub reader (its
    one-line errors for an unreachable hub included), checked row by row."""
    convs = []
    for i, messages in enumerate(corpus.hub_documents(name, split, text_field="messages", **load_kwargs)):
        if limit is not None and i >= limit:
            break
        convs.append(check_conversation(messages, f"{name} row {i}"))
    if not convs:
        raise DataError(f"{name} split {split!r} holds no conversation")
    return convs


def offline_set(data_dir: str, build, name: str, what: str) -> tuple:
    """(train, val) paths of an offline set in data_dir, built by build(out_dir=data_dir) from the default
    corpus when missing: this lesson's instruction set, lesson 10's preference pairs."""
    train, val = Path(data_dir) / "train.jsonl", Path(data_dir) / "val.jsonl"
    if not (train.is_file() and val.is_file()):
        counts = build(out_dir=data_dir)
        print(f"built the offline {name}: {counts['train']:,} train / {counts['val']:,} val {what}s in {data_dir}")
    return train, val


def default_data(data_dir: str) -> tuple:
    """(train, val) paths of the offline instruction set."""
    return offline_set(data_dir, instructions.build, "instruction set", "conversation")


def held_out(items: list, val_fraction: float, what: str) -> tuple:
    """(train, val): lesson 01's rule on each item's own text, so the same split on every run and rank."""
    is_val = [prepare.is_val(json.dumps(item, sort_keys=True), val_fraction) for item in items]
    train, val = [x for x, v in zip(items, is_val) if not v], [x for x, v in zip(items, is_val) if v]
    if not train or not val:
        raise DataError(f"{len(items)} {what}s give {len(train)} train and {len(val)} val; "
                        f"fix: more {what}s, another --val_fraction, or --val_data")
    return train, val


def train_val_conversations(data, val_data, hf_dataset, hf_split, hf_limit, data_dir, val_fraction) -> tuple:
    """(train, val) conversation lists from --data JSONL files, a hub dataset, or the offline set in data_dir."""
    if hf_dataset:
        convs = hub_conversations(hf_dataset, hf_split, hf_limit or None)
    elif data:
        convs = [c for path in data for c in read_jsonl(path)]
    else:
        train_path, val_path = default_data(data_dir)
        return read_jsonl(train_path), read_jsonl(val_path)
    if val_data:
        return convs, [c for path in val_data for c in read_jsonl(path)]
    return held_out(convs, val_fraction, "conversation")


# ---- token rows out ------------------------------------------------------------------------------------

def fit_turns(turns: list, bos_id: int, max_len: int) -> tuple | None:
    """(ids, mask) of the longest prefix of whole turns that ends with an assistant turn and has at most
    max_len tokens (BOS included); None when not even the first answer fits."""
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
    """Whole examples, in order, concatenated into rows of at most max_len tokens; (ids, mask) per row.
    Every example fits (fit_turns), so no example is split and no row crosses max_len."""
    rows, ids, mask = [], [], []
    for ex_ids, ex_mask in examples:
        if ids and len(ids) + len(ex_ids) > max_len:
            rows.append((ids, mask))
            ids, mask = [], []
        ids, mask = ids + ex_ids, mask + ex_mask
    if ids:
        rows.append((ids, mask))
    return rows


def collate(rows: list, pad_id: int) -> tuple:
    """Rows -> (inputs (B, T), targets (B, T)), T = longest row - 1: token t predicts token t + 1, and the
    target is IGNORE where token t + 1 is not an assistant token or is padding. Any pad_id will do: the
    padding comes after a row's last token, where the causal mask hides it from every real position."""
    T = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)  # (B, T)
    for b, (ids, mask) in enumerate(rows):
        row = torch.tensor(ids, dtype=torch.long)
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        inputs[b, : len(ids) - 1] = row[:-1]
        targets[b, : len(ids) - 1] = torch.where(keep, row[1:], IGNORE)
    return inputs, targets


if __name__ == "__main__":
    def demo():
        fmt = template.ChatFormat(tokenizer_lib.load_tokenizer())
        train_path, _ = default_data(instructions.DEFAULT_DIR)
        examples, counts = encode_all(fmt, read_jsonl(train_path), max_len=256)
        rows = pack(examples, 256)
        n_tokens, n_targets = sum(len(ids) for ids, _ in examples), sum(sum(m) for _, m in examples)
        print(f"{len(examples):,} conversations ({counts}), {n_tokens / len(examples):.0f} tokens each on average, "
              f"{100 * n_targets / n_tokens:.0f}% of them assistant tokens (trained)")
        print(f"packed into {len(rows):,} rows of <= 256 tokens, {n_tokens / len(rows):.0f} tokens per row "
              f"(one conversation per row: {len(examples):,} rows)")
        x, y = collate(rows[:2], fmt.eot_id)
        assert all(len(ids) <= 256 for ids, _ in rows) and (y != IGNORE).sum() == sum(sum(m[1:]) for _, m in rows[:2])
        print("checked: no row crosses 256 tokens, and the targets are exactly the masked-in tokens")

    corpus.exit_on_data_error(demo)
