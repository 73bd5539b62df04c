"""The verifiable task: prompts whose answers a short function can check, and that function, the reward.

    reward(completion, answers) = 1  if normalize(completion) equals normalize(an answer), else 0
    normalize(text)             = NFKC of the case-folded text, every run of characters that are not Unicode
                                  letters, digits or marks a single space, trimmed

The speaker task, one item per speech of the plays, in lesson 08's wording (validation: lesson 01's held-out scenes):

    open     user: "Who says this?\\n<line>"                                    assistant: "<speaker>"
    choice   user: "Who says this? Lear, Kent, Fool or Gon?\\n<line>"           assistant: "<speaker>"

`--sft N` writes N training prompts with their answers as lesson 08 conversations, for a warm-up SFT (notes.md §4).
Your own task: JSONL of {"prompt": ...} or {"messages": [...]} with "answer" (a string or a list of accepted ones),
as --data / --val_data. Left out on purpose: partial credit, format rewards, learned reward models.

Demo (writes data/grpo/{choice,open}/{train,val}.jsonl): python 11_grpo/data.py [--sft 20000]
"""

import argparse
import json
import random
import sys
import unicodedata
from importlib import import_module
from pathlib import Path

import numpy as np
import regex  # Unicode classes (\p{L}), which `re` lacks; lesson 01's BPE uses it too

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
commands = import_module("01_tokenizer.commands")
corpus = import_module("01_tokenizer.corpus")
prepare = import_module("01_tokenizer.prepare")
template = import_module("08_sft.template")
sft_data = import_module("08_sft.data")  # the speech parser, the JSONL reader, the offline-set writer
bench = import_module("09_eval.data")  # plays of scenes, the distractor draw

DataError = commands.DataError
FORMS = ("choice", "open")
DEFAULT_DIR = "data/grpo"
NOT_WORD = regex.compile(r"[^\p{L}\p{N}\p{M}]+")  # a run of anything but letters, digits and combining marks


def normalize(text: str) -> str:
    """'  King  Lear! ' -> 'king lear', 'ZOË' -> 'zoë': case, punctuation and spacing never decide a reward; letters
    do, accented ones included (Zoë is neither Zoe nor Zo). NFKC makes a composed é and e + a combining accent one."""
    return NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text.casefold())).strip()


def reward(completion: str, answers: list) -> float:
    """1.0 when the completion, normalized, is exactly one of the answers, normalized; else 0.0. An empty completion
    earns nothing, nor does a right name inside a longer answer ("It is Lear"): listing every name cannot game it."""
    said = normalize(completion)
    return float(bool(said) and any(said == normalize(a) for a in answers))


def question(line: str, choices: list | None = None) -> str:
    listed = f" {', '.join(choices[:-1])} or {choices[-1]}?" if choices else ""
    return f"Who says this?{listed}\n{line}"


def play_items(scenes: list, rng: random.Random) -> list:
    """[{"line", "answer", "choices"}] of one play's scenes: one per speech by a named character (not an act
    number the parser took for a label) in a play with at least four of them."""
    speakers = [n for doc in scenes for n, _ in sft_data.speeches(doc) if not bench.ROMAN.fullmatch(n.upper())]
    if len(set(speakers)) < 4:
        return []
    out = []
    for doc in scenes:
        for name, lines in sft_data.speeches(doc):
            if name in speakers:
                choices, _ = bench.shuffled(name, bench.draw_names(rng, [n for n in speakers if n != name], 3), rng)
                out.append({"line": lines[0], "answer": name, "choices": choices})
    return out


def build(out_dir=DEFAULT_DIR, corpus_spec="shakespeare", cache_dir=corpus.DEFAULT_CACHE_DIR, seed: int = 0,
          val_fraction: float = prepare.DEFAULT_VAL_FRACTION, docs=None) -> dict:
    """Write out_dir/{form}/{train,val}.jsonl for both forms (the same items, two wordings); return the counts.
    The split is lesson 01's per-scene rule: validation items come from the scenes held out of pretraining."""
    docs = list(corpus.documents(corpus_spec, cache_dir) if docs is None else docs)
    held_out = lambda d: corpus.HEADING.match(d) and prepare.is_val(d, val_fraction)
    plays = {"train": bench.plays([d for d in docs if not held_out(d)], 1.0), "val": bench.plays(docs, val_fraction)}
    items = {}
    for split, scene_lists in plays.items():
        rng = random.Random(f"{seed}/grpo/{split}")  # a string seed: the same items on every machine
        items[split] = [item for scenes in scene_lists for item in play_items(scenes, rng)]
    for form in FORMS:
        rows = {split: [{"messages": [{"role": "user", "content": question(it["line"], it["choices"] if form == "choice" else None)}],
                         "answer": it["answer"]} for it in split_items] for split, split_items in items.items()}
        counts = sft_data.write_splits(rows, Path(out_dir) / form, "prompt", f"{corpus_spec} (four or more speakers per play)")
    return counts


def task_files(data_dir, form: str) -> tuple:
    """(train, val) paths of the built-in task in one form, built from the default corpus when missing."""
    return sft_data.offline_set(Path(data_dir) / form, lambda out_dir: build(data_dir), "speaker task", "prompt")


def write_sft(path, train_path, count: int, seed: int = 0) -> int:
    """Write `count` of the task's training prompts with their answers as lesson 08 conversations (its --data)."""
    items = read_prompts(train_path)
    picked = random.Random(f"{seed}/grpo/sft").sample(items, min(count, len(items)))
    with commands.atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps({"messages": it["messages"] + [{"role": "assistant", "content": it["answers"][0]}]}) + "\n"
                               for it in picked))
    return len(picked)


def read_prompts(path) -> list:
    """[{"messages", "answers"}] of a JSONL file of {"prompt" | "messages", "answer"}; a bad line is a DataError."""
    rows = sft_data.jsonl_rows(path, "prompt", '{"prompt": ..., "answer": ...}', "the built-in speaker task")
    fix = 'fix: each line must be {"prompt": "...", "answer": "..."} or {"messages": [...], "answer": [...]}'
    items = []
    for where, row in rows:
        if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
            raise DataError(f"{where} needs exactly one of \"prompt\" and \"messages\"; {fix}")
        messages = [{"role": "user", "content": row["prompt"]}] if "prompt" in row else row["messages"]
        try:
            template.check_messages(messages)
        except ValueError as e:
            raise DataError(f"{where}: {e}; {fix}") from None
        if messages[-1]["role"] != "user":
            raise DataError(f"{where}: the last message is the {messages[-1]['role']}'s; the model answers a user; {fix}")
        answers = [row.get("answer")] if isinstance(row.get("answer"), str) else row.get("answer")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and normalize(a) for a in answers):
            raise DataError(f"{where}: \"answer\" must be a non-empty string or list of them (with a letter or digit); {fix}")
        items.append({"messages": messages, "answers": answers})
    return items


def spread(items: list, count: int) -> list:
    """`count` items spread evenly over the list (all of them if fewer): a fixed validation set."""
    return [items[i] for i in np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int)]


def task_prompts(cfg: dict, fmt, max_len: int) -> tuple:
    """(train prompts, the fixed validation prompts, their files) of a GRPO run's flags; prompts too long to leave
    max_new_tokens inside the model's window are dropped."""
    train_paths, val_paths = (cfg["data"], cfg["val_data"]) if cfg["data"] else ([p] for p in task_files(cfg["data_dir"], cfg["task"]))
    fits = lambda item: len(fmt.encode(item["messages"], add_generation_prompt=True)[0]) + cfg["max_new_tokens"] <= max_len
    train = [item for path in train_paths for item in read_prompts(path) if fits(item)]
    val = [item for item in spread([item for path in val_paths for item in read_prompts(path)], cfg["eval_prompts"]) if fits(item)]
    if len(train) < cfg["batch_size"] * cfg["grad_accum"] // cfg["group_size"] or len(val) < 2:
        raise DataError(f"{len(train)} train and {len(val)} validation prompts fit max_seq_len {max_len} with room for "
                        f"{cfg['max_new_tokens']} new tokens: too few; fix: shorter prompts or a lower --max_new_tokens")
    return train, val, ", ".join(map(str, val_paths))


if __name__ == "__main__":
    def demo():
        parser = argparse.ArgumentParser(description="Build the speaker task; optionally a warm-up SFT set of one form.")
        parser.add_argument("--sft", type=int, default=0, help="also write DATA_DIR/{form}_sft.jsonl with this many conversations")
        parser.add_argument("--form", default="choice", choices=FORMS, help="the form of that SFT set")
        parser.add_argument("--data_dir", default=DEFAULT_DIR, help="where the task is written")
        args = parser.parse_args()
        counts = build(args.data_dir)
        print(f"wrote {args.data_dir}/{{choice,open}}/{{train,val}}.jsonl: {counts['train']:,} train, {counts['val']:,} val prompts")
        for form in FORMS:
            item = read_prompts(Path(args.data_dir) / form / "val.jsonl")[0]
            print(f"{form:>6}: {item['messages'][-1]['content']!r} -> {item['answers'][0]!r}")
        cases = [("Lear", 1.0), (" lear. ", 1.0), ("LEAR!", 1.0), ("It is Lear", 0.0), ("", 0.0), ("Kent", 0.0)]
        assert all(reward(said, ["Lear"]) == r for said, r in cases)
        print(f"checked: reward against 'Lear': {', '.join(f'{s!r} {r:.0f}' for s, r in cases)}")
        if args.sft:
            path = Path(args.data_dir) / f"{args.form}_sft.jsonl"
            n = write_sft(path, Path(args.data_dir) / args.form / "train.jsonl", args.sft)
            print(f"wrote {path}: {n:,} conversations for lesson 08 (python 08_sft/sft.py --data {path})")

    commands.exit_on_data_error(demo)
