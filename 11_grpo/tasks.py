"""The verifiable task: prompts whose answers a short function can check, and that function (the reward).

    reward(completion, answers) = 1  if normalize(completion) equals normalize(an answer), else 0
    normalize(text)             = NFKC of the case-folded text, every run of characters that are not Unicode
                                  letters, digits or marks a single space, trimmed

Built offline from the default corpus, in lesson 08's wording (the SFT model has learned this turn):

    open     user: "Who says this?\\n<line>"                                    assistant: "<speaker>"
    choice   user: "Who says this? Lear, Kent, Fool or Gon?\\n<line>"           assistant: "<speaker>"

One item per speech: its first line, the speaker as the answer. The choice form lists four characters of
the same play, one right (lesson 09's draw: distractors in proportion to their speeches), so picking
blindly among them would earn 25%. The split is lesson 01's per-scene rule: validation items come from
the scenes held out of pretraining (lesson 09's benchmark reads the same scenes). A policy gradient has
nothing to push on where no sample is ever rewarded, and the CPU main job's SFT model almost never
answers either form right (pass@8 under 1%, notes.md section 4): `--sft N` writes N training prompts with
their answers as lesson 08 conversations, for a short SFT on the form before RL.

Your own task: a JSONL file, one {"prompt": "..."} or {"messages": [...]} per line with "answer" (a string
or a list of accepted strings), passed as --data / --val_data; the same exact checker scores it. Another
checker (a number's value, a unit test) replaces `reward` alone: it sees the completion's text and the answers.
Left out on purpose: partial credit, format rewards, learned reward models.

Demo (writes data/grpo/{open,choice}_{train,val}.jsonl): python 11_grpo/tasks.py [--sft 20000]
"""

import json
import random
import sys
import unicodedata
from importlib import import_module
from pathlib import Path

import regex  # Unicode classes (\p{L}), which `re` lacks; lesson 01's BPE uses it too

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
corpus = import_module("01_tokenizer.corpus")
prepare = import_module("01_tokenizer.prepare")
template = import_module("08_sft.template")
instructions = import_module("08_sft.instructions")  # the speech parser
chat_data = import_module("08_sft.chat_data")  # the JSONL reader
benchmark = import_module("09_eval.benchmark")  # plays of scenes, the distractor draw

DataError = corpus.DataError
FORMS = ("choice", "open")
DEFAULT_DIR = "data/grpo"
NOT_WORD = regex.compile(r"[^\p{L}\p{N}\p{M}]+")  # a run of anything but letters, digits and combining marks


def normalize(text: str) -> str:
    """'  King  Lear! ' -> 'king lear', 'ZOË' -> 'zoë': case, punctuation and spacing never decide a reward; letters
    do, accented ones included (Zoë is not Zoe, nor Zo): accents are not folded. NFKC makes a composed é and an e
    followed by a combining accent the same letter."""
    return NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text.casefold())).strip()


def reward(completion: str, answers: list) -> float:
    """1.0 when the completion, normalized, is exactly one of the answers, normalized; else 0.0. An empty
    completion earns nothing, and so does a right name inside a longer answer ("It is Lear"): exactness is
    what makes the reward impossible to game by listing every name."""
    said = normalize(completion)
    return float(bool(said) and any(said == normalize(a) for a in answers))


def question(line: str, choices: list | None = None) -> str:
    """The user's turn: lesson 08's "Who says this?", with the four names listed in the choice form."""
    listed = f" {', '.join(choices[:-1])} or {choices[-1]}?" if choices else ""
    return f"Who says this?{listed}\n{line}"


def play_items(scenes: list, rng: random.Random) -> list:
    """[{"line", "answer", "choices"}] of one play's scenes: one per speech by a character with a name
    (not an act number the parser took for a label) in a play with at least four of them."""
    speakers = [n for doc in scenes for n, _ in instructions.speeches(doc) if not benchmark.ROMAN.fullmatch(n.upper())]
    if len(set(speakers)) < 4:
        return []
    out = []
    for doc in scenes:
        for name, lines in instructions.speeches(doc):
            if name in speakers:
                others = benchmark.draw_names(rng, [n for n in speakers if n != name], 3)
                choices, _ = benchmark.shuffled(name, others, rng)
                out.append({"line": lines[0], "answer": name, "choices": choices})
    return out


def build(out_dir=DEFAULT_DIR, corpus_spec="shakespeare", cache_dir=corpus.DEFAULT_CACHE_DIR, seed: int = 0,
          val_fraction: float = prepare.DEFAULT_VAL_FRACTION, docs=None) -> dict:
    """Write {form}_{split}.jsonl under out_dir for both forms (the same items, two wordings); return the counts."""
    docs = list(corpus.documents(corpus_spec, cache_dir) if docs is None else docs)
    held_out = lambda d: corpus.HEADING.match(d) and prepare.is_val(d, val_fraction)  # noqa: E731 (lesson 01's rule)
    plays = {"train": benchmark.plays([d for d in docs if not held_out(d)], 1.0),  # every remaining scene, grouped by play
             "val": benchmark.plays(docs, val_fraction)}
    counts = {}
    for split, scene_lists in plays.items():
        rng = random.Random(f"{seed}/grpo/{split}")  # a string seed: the same items on every machine
        items = [item for scenes in scene_lists for item in play_items(scenes, rng)]
        if not items:
            raise DataError(f"{corpus_spec} gives no {split} items; fix: a corpus of plays (speaker label on its own line, "
                            "then the speech) with four or more speakers per play")
        for form in FORMS:
            rows = [{"messages": [{"role": "user", "content": question(it["line"], it["choices"] if form == "choice" else None)}],
                     "answer": it["answer"]} for it in items]
            with corpus.atomic_write(Path(out_dir) / f"{form}_{split}.jsonl") as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        counts[split] = len(items)
    return counts


def default_data(data_dir, form: str) -> tuple:
    """(train, val) paths of the built-in task in one form, built from the default corpus when missing."""
    paths = tuple(Path(data_dir) / f"{form}_{split}.jsonl" for split in ("train", "val"))
    if not all(p.is_file() for p in paths):
        counts = build(data_dir)
        print(f"built the speaker task: {counts['train']:,} train / {counts['val']:,} val prompts in {data_dir}")
    return paths


def write_sft(path, train_path, count: int, seed: int = 0) -> int:
    """Write `count` of the task's training prompts with their answers as lesson 08 conversations (its --data):
    a short SFT on the form, for a model that never answers it right and so gives RL nothing to reinforce."""
    items = read_prompts(train_path)
    picked = random.Random(f"{seed}/grpo/sft").sample(items, min(count, len(items)))
    rows = [{"messages": item["messages"] + [{"role": "assistant", "content": item["answers"][0]}]} for item in picked]
    with corpus.atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def read_prompts(path) -> list:
    """[{"messages", "answers"}] of a JSONL file of {"prompt" | "messages", "answer"}; the first bad line is a
    one-line DataError naming file and line."""
    rows = chat_data.jsonl_rows(path, "prompt", '{"prompt": ..., "answer": ...}', "the built-in speaker task")
    return [parse_item(row, where) for where, row in rows]


def parse_item(row, where: str) -> dict:
    fix = 'fix: each line must be {"prompt": "...", "answer": "..."} or {"messages": [...], "answer": [...]}'
    if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
        raise DataError(f"{where} needs exactly one of \"prompt\" and \"messages\"; {fix}")
    messages = [{"role": "user", "content": row["prompt"]}] if "prompt" in row else row["messages"]
    try:
        template.check_messages(messages)
    except ValueError as e:
        raise DataError(f"{where}: {e}; {fix}") from None
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: the last message is the {messages[-1]['role']}'s; the model answers a user; {fix}")
    answers = row.get("answer")
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and normalize(a) for a in answers):
        raise DataError(f"{where}: \"answer\" must be a non-empty string or list of them (with a letter or digit); {fix}")
    return {"messages": messages, "answers": answers}


if __name__ == "__main__":
    def demo():
        import argparse

        parser = argparse.ArgumentParser(description="Build the speaker task; optionally a warm-up SFT set of one form.")
        parser.add_argument("--sft", type=int, default=0, help="also write data/grpo/{form}_sft.jsonl with this many conversations")
        parser.add_argument("--form", default="choice", choices=FORMS, help="the form of that SFT set")
        args = parser.parse_args()
        counts = build()
        print(f"wrote {DEFAULT_DIR}/{{open,choice}}_{{train,val}}.jsonl: {counts['train']:,} train, {counts['val']:,} val prompts")
        for form in FORMS:
            item = read_prompts(Path(DEFAULT_DIR) / f"{form}_val.jsonl")[0]
            print(f"{form:>6}: {item['messages'][-1]['content']!r} -> {item['answers'][0]!r}")
        cases = [("Lear", 1.0), (" lear. ", 1.0), ("LEAR!", 1.0), ("It is Lear", 0.0), ("", 0.0), ("Kent", 0.0)]
        assert all(reward(said, ["Lear"]) == r for said, r in cases)
        print(f"checked: reward against 'Lear': {', '.join(f'{s!r} {r:.0f}' for s, r in cases)}")
        if args.sft:
            path = Path(DEFAULT_DIR) / f"{args.form}_sft.jsonl"
            n = write_sft(path, Path(DEFAULT_DIR) / f"{args.form}_train.jsonl", args.sft)
            print(f"wrote {path}: {n:,} conversations for lesson 08 (python 08_sft/sft.py --data {path})")

    corpus.exit_on_data_error(demo)
