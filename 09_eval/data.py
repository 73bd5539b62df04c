"""The offline benchmark's data: three tasks cut from the validation scenes of the default corpus.

    next_line   a window of a scene, then its true next line against 3 lines from elsewhere in the play  (4 choices)
    speaker     a window of a scene, then "LABEL.\\n<line>": which of 4 characters of the play speaks it   (4 choices)
    last_word   a window of a scene ending just before the last word of a speech: greedy, exact match

Only validation scenes (lesson 01's prepare.is_val(doc, 0.05)) give text, distractors included, so a model
pretrained on train.bin has seen none of it. A play runs from one cast list (a document without an ACT/SCENE
heading) to the next; speeches come from lesson 08's parser. Every item also has a chat form in lesson 08's
wording. Deterministic (string-seeded RNGs per task); written as JSONL with meta.json (notes.md §4).

Demo (writes data/eval/): python 09_eval/data.py
"""

import argparse
import hashlib
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
sft_data = import_module("08_sft.data")

DEFAULT_DIR = "data/eval"
TASKS = {  # name -> how it is scored, chance level, the metric the table shows for base and chat forms (notes.md §2, §4)
    "next_line": {"kind": "choice", "baseline": 0.25, "metric": "acc_token", "chat_metric": "acc_token"},
    "speaker": {"kind": "choice", "baseline": 0.25, "metric": "acc_bytes", "chat_metric": "acc_token"},
    "last_word": {"kind": "exact", "baseline": 0.0, "metric": "exact", "chat_metric": "exact"},
}
WINDOW = 8  # lines of the scene shown before the question (labels and blank lines count)
MAX_ITEMS = 1000
LAST_WORD = re.compile(r"([A-Za-z][A-Za-z']*)[^A-Za-z']*$")
ROMAN = re.compile(r"[IVXL]+")  # "Ii", "Iv": act numbers the speech parser can take for labels


def label_style(name: str, doc: str):
    """How this scene writes a speaker's label ("CAESAR.", "Laer.", "LYSANDER"), as a function of the name."""
    for style in (lambda n: n.upper() + ".", lambda n: n + ".", str.upper, str):
        if f"\n{style(name)}\n" in f"\n{doc}\n":
            return style
    return lambda n: n.upper() + "."


def render(doc: str) -> list:
    """A scene as text lines, labels in its own style: [(text, speech index, line index or -1 for the label)]."""
    out = []
    for s, (name, lines) in enumerate(sft_data.speeches(doc)):
        out.append((label_style(name, doc)(name), s, -1))
        out += [(line, s, k) for k, line in enumerate(lines)]
        out.append(("", s, None))  # the blank line between speeches
    return out


def window(rendered: list, p: int) -> str:
    """The WINDOW text lines before line p, each ending with a newline."""
    return "".join(text + "\n" for text, _, _ in rendered[max(0, p - WINDOW) : p])


def plays(docs, val_fraction: float) -> list:
    """[[validation scene, ...] per play], plays in corpus order; a new play starts at each document without a heading."""
    out = []
    for doc in docs:
        if not corpus.HEADING.match(doc) or not out:
            out.append([])
        if corpus.HEADING.match(doc) and prepare.is_val(doc, val_fraction):
            out[-1].append(doc)
    return [scenes for scenes in out if scenes]


def shuffled(answer: str, others: list, rng: random.Random) -> tuple:
    """(choices, label): the answer at a random place among the others."""
    label = rng.randrange(len(others) + 1)
    return others[:label] + [answer] + others[label:], label


def draw_names(rng: random.Random, speakers: list, k: int) -> list:
    """k distinct names, each drawn in proportion to its speeches, as the answers are (notes.md §4)."""
    out = []
    while len(out) < k:
        name = rng.choice(speakers)
        if name not in out:
            out.append(name)
    return out


def play_items(scenes: list, rng: dict) -> dict:
    """The items of one play's validation scenes, per task."""
    # Distractors come from the answers' own population, lines after a speech's first: first lines are shorter,
    # and a scorer that prefers long lines (per byte: the newline token weighs less) would beat chance untrained.
    lines = sorted({line for doc in scenes for _, ls in sft_data.speeches(doc) for line in ls[1:]})
    speakers = [n for doc in scenes for n, _ in sft_data.speeches(doc) if not ROMAN.fullmatch(n.upper())]  # one per speech
    names = sorted(set(speakers))
    out = {task: [] for task in TASKS}
    for doc in scenes:
        speeches, rendered = sft_data.speeches(doc), render(doc)
        style = label_style(speeches[0][0], doc) if speeches else str
        for p, (text, s, k) in enumerate(rendered):
            if k is None:  # the blank line between speeches
                continue
            name, speech = speeches[s]
            if k >= 1 and len(lines) > 3:  # next_line: a speech's next line, given the window
                others = rng["next_line"].sample([x for x in lines if x != text], 3)
                choices, label = shuffled(text, others, rng["next_line"])
                chat = {"messages": [{"role": "user", "content": "Continue this speech:\n" + "\n".join(speech[max(0, k - 3) : k])}],
                        "choices": choices}
                out["next_line"].append({"context": window(rendered, p), "choices": choices, "label": label, "chat": chat})
            if k == 0 and s > 0 and name in names and len(names) >= 4:  # speaker: the label and the first line
                others = draw_names(rng["speaker"], [n for n in speakers if n != name], 3)
                who, label = shuffled(name, others, rng["speaker"])
                chat = {"messages": [{"role": "user", "content": f"Who says this?\n{text}"}], "choices": who}
                out["speaker"].append({"context": window(rendered, p - 1), "choices": [f"{style(n)}\n{text}" for n in who],
                                       "label": label, "chat": chat})
            if k == len(speech) - 1 and (m := LAST_WORD.search(text)) and len(m.group(1)) > 1:
                head = text[: m.start(1)]  # the last line up to its last word
                if k == 0 and not head.strip():
                    continue  # a one-word speech: nothing of it to go on
                # Chat: the line before as the user's, the last line's head as the start of the answer; a one-line
                # speech gives its head as the user's line and the word is the whole answer.
                user, prefill = (speech[k - 1], head) if k else (head.rstrip(), "")
                chat = {"messages": [{"role": "user", "content": f"Continue this speech:\n{user}"}], "prefill": prefill, "target": m.group(1)}
                out["last_word"].append({"context": window(rendered, p) + head, "target": m.group(1), "chat": chat})
    return out


def build(out_dir=DEFAULT_DIR, corpus_spec="shakespeare", cache_dir=corpus.DEFAULT_CACHE_DIR, seed: int = 0,
          val_fraction: float = prepare.DEFAULT_VAL_FRACTION, max_items: int = MAX_ITEMS, docs=None) -> dict:
    """Write <task>.jsonl and meta.json under out_dir; return meta. docs: the documents (default: the corpus')."""
    rng = {task: random.Random(f"{seed}/{task}") for task in TASKS}  # str seeds: the same on every machine
    items = {task: [] for task in TASKS}
    val_plays = plays(corpus.documents(corpus_spec, cache_dir) if docs is None else docs, val_fraction)
    for scenes in val_plays:
        for task, rows in play_items(scenes, rng).items():
            items[task] += rows
    out_dir = Path(out_dir)  # atomic_write makes it
    source = corpus.describe(corpus_spec) if docs is None else "documents passed to build()"
    meta = {"source": source, "split": f"01_tokenizer/prepare.py is_val(doc, {val_fraction})",
            "val_scenes": sum(map(len, val_plays)), "plays": len(val_plays), "seed": seed, "max_items": max_items, "tasks": {}}
    if docs is None and corpus_spec == "shakespeare":  # documents() has just checked the tarball's sha256
        meta["source_sha256"] = corpus.SHAKESPEARE_SHA256
    for task, rows in items.items():
        available = len(rows)
        if len(rows) > max_items:  # a sample, kept in corpus order
            rows = [rows[i] for i in sorted(random.Random(f"{seed}/{task}/sample").sample(range(len(rows)), max_items))]
        text = "".join(json.dumps({"id": f"{task}-{i:04d}", **row}) + "\n" for i, row in enumerate(rows))
        with commands.atomic_write(out_dir / f"{task}.jsonl") as tmp:
            tmp.write_text(text)
        meta["tasks"][task] = {**TASKS[task], "file": f"{task}.jsonl", "items": len(rows), "available": available,
                               "sha256": hashlib.sha256(text.encode()).hexdigest()}
    with commands.atomic_write(out_dir / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_task(path) -> list:
    """The items of one task file; a one-line error for a missing, empty or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no task file at {path}: build the benchmark with `python 09_eval/data.py`")
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSONL ({e.msg} at line {e.lineno}); rebuild it with `python 09_eval/data.py`") from None
    if not rows:
        raise ValueError(f"{path} has no items; rebuild it with `python 09_eval/data.py`")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build the offline benchmark from the default corpus's validation scenes.")
    parser.add_argument("--out_dir", default=DEFAULT_DIR, help="where the task files and meta.json go")
    out_dir = Path(parser.parse_args().out_dir)

    def demo():
        meta = build(out_dir)
        for task, info in meta["tasks"].items():
            print(f"{task:<10} {info['items']:>5} items (of {info['available']:,}), chance {info['baseline']:.2f}, sha256 {info['sha256'][:12]}")
        first = load_task(out_dir / "speaker.jsonl")[0]
        print(f"speaker item 0:\n{first['context']}--- choices: {first['choices']} (label {first['label']})")
        assert all(info["items"] >= 500 for info in meta["tasks"].values()), "every task needs 500 items"
        print(f"checked: {meta['val_scenes']} validation scenes of {meta['plays']} plays give 500+ items per task")

    commands.exit_on_data_error(demo)
