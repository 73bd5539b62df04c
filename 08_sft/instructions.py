"""The offline instruction set: conversations about the default corpus, built from its plays.

Supervised fine-tuning needs conversations, and the hub's chat sets are out of reach offline. The plays
of lesson 01's corpus already pair every speech with its speaker, which gives questions with short,
checkable answers:

    speaker    user: "Who says this?\\n<a line>"          assistant: "<the speaker>"
    continue   user: "Continue this speech:\\n<a line>"   assistant: "<the next line>"
    both       the two as one conversation of two exchanges (multi-turn), sometimes under a system message

The point is not literary knowledge (a tiny model guesses most speakers wrong) but form: after a few
hundred steps the model answers in one short turn and ends it with </s>, where the base model rambles
on in play format. The split follows lesson 01's per-document rule, so the validation conversations
come from scenes the base model was not pretrained on.

Left out on purpose: paraphrased prompts, answers longer than one line, any filtering by quality.

Demo (writes data/sft/shakespeare_{train,val}.jsonl): python 08_sft/instructions.py
"""

import json
import os
import random
import re
import sys
from importlib import import_module
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
corpus = import_module("01_tokenizer.corpus")
prepare = import_module("01_tokenizer.prepare")

# A speech is a block: the speaker's label on its own line ("KING HENRY.", "Ham.", "LYSANDER"), then its lines.
SPEAKER = re.compile(r"(?:[A-Z][A-Za-z'-]*\.? ?){1,3}")
SYSTEM = "You answer questions about Shakespeare's plays in one line."
DEFAULT_DIR = "data/sft"


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
    """The conversations of one scene: one per speech of at least two lines, of a kind drawn by `rng`.
    Lesson 01 cuts each play at its ACT/SCENE headings; a document that does not start with one is a
    cast list or a poem, whose label-like lines ("KING OF FRANCE.") are not speeches."""
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


def build(corpus_spec="shakespeare", out_dir=DEFAULT_DIR, cache_dir=corpus.DEFAULT_CACHE_DIR, seed: int = 0) -> dict:
    """Write train.jsonl and val.jsonl under out_dir (atomically); return the counts."""
    rng = random.Random(seed)
    rows = {"train": [], "val": []}
    for doc in corpus.documents(corpus_spec, cache_dir):
        # Lesson 01's rule and fraction: the same scenes are validation here as in pretraining.
        rows["val" if prepare.is_val(doc, prepare.DEFAULT_VAL_FRACTION) else "train"] += conversations(doc, rng)
    if not rows["train"] or not rows["val"]:
        raise corpus.DataError(f"{corpus_spec} gave {len(rows['train'])} train and {len(rows['val'])} val conversations; "
                               "fix: use a corpus of plays (speaker label on its own line, then the speech)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, convs in rows.items():
        tmp = out_dir / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(c) + "\n" for c in convs))
        os.replace(tmp, out_dir / f"{name}.jsonl")  # never a half-written file under the final name
    return {name: len(convs) for name, convs in rows.items()}


if __name__ == "__main__":
    def demo():
        counts = build()
        print(f"wrote {DEFAULT_DIR}/train.jsonl ({counts['train']:,} conversations) and val.jsonl ({counts['val']:,})")
        with open(Path(DEFAULT_DIR) / "train.jsonl") as f:
            first = [json.loads(next(f)) for _ in range(3)]
        for conv in first:
            print(" | ".join(f"{m['role']}: {m['content']!r}" for m in conv["messages"]))
        assert all(conv["messages"][-1]["role"] == "assistant" for conv in first)
        print("checked: every conversation ends with an assistant answer, the part fine-tuning learns")

    corpus.exit_on_data_error(demo)
