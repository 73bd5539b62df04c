"""What DPO trains on: pairs of a prompt, a better answer and a worse one, read, checked and turned into rows.

    pair    = (prompt messages, chosen answer, rejected answer, kind)
    rows    = ChatFormat.encode(prompt + [chosen]), ChatFormat.encode(prompt + [rejected])   lesson 08's ids and mask
    collate = B pairs -> inputs (2B, T), targets (2B, T): the B chosen rows, then the B rejected rows (TRL's order)

Rows are TRL's columns, one JSON object per line of a JSONL file or per row of a Hugging Face dataset:
    standard         {"prompt": "text", "chosen": "text", "rejected": "text"}   the prompt becomes one user turn
    conversational   {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
                     ("messages" is taken as another name for the prompt's conversation)
    implicit prompt  {"chosen": [messages], "rejected": [messages]}: two whole conversations that share all but
                     their last (assistant) message, as in HuggingFaceH4/ultrafeedback_binarized
Every problem a user can fix is a one-line DataError naming the file and line: an empty answer, a chosen
answer equal to the rejected one (nothing to prefer), a prompt that does not end with the user's turn.

The offline set (build) comes from the plays of the default corpus, in lesson 08's wording, where the
better answer is checkable:
    speaker    "Who says this?\\n<line>"         chosen: the speaker     rejected: another character of the scene
    continue   "Continue this speech:\\n<line>"  chosen: the next line   rejected: a line of another speech of the scene
Scenes split by lesson 01's rule, as lesson 08's instruction set: validation pairs come from unseen scenes.
The alternative negatives are the model's own mistakes: `--sample_from CKPT` samples the SFT model on the
training prompts and keeps, for each, a sampled answer that is wrong (sample_rejections).

Left out on purpose: ties and graded preferences (scores), several rejected answers per prompt, prompt
truncation (a pair longer than max_seq_len is dropped and counted).

Demo (writes data/dpo/{train,val}.jsonl):         python 10_dpo/preferences.py
Rejections sampled from an SFT model instead:      python 10_dpo/preferences.py --sample_from out/sft/ckpt_best
"""

import argparse
import json
import random
import sys
from importlib import import_module
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
corpus = import_module("01_tokenizer.corpus")
prepare = import_module("01_tokenizer.prepare")
tokenizer_lib = import_module("01_tokenizer.tokenizer")
generate = import_module("06_model.generate")
template = import_module("08_sft.template")
instructions = import_module("08_sft.instructions")
chat_data = import_module("08_sft.chat_data")
benchmark = import_module("09_eval.benchmark")

DataError = corpus.DataError
DEFAULT_DIR = "data/dpo"
QUESTIONS = {"speaker": "Who says this?\n", "continue": "Continue this speech:\n"}  # lesson 08's wording


class Pair(NamedTuple):
    prompt: list  # messages, ending with the user's turn
    chosen: str  # the better answer
    rejected: str  # the worse one
    kind: str = ""  # "speaker", "continue", or "" (a user's pair)


# ---- pairs in: TRL's columns, checked -------------------------------------------------------------------

def _answer(value, what: str, where: str):
    """(text of an answer, the conversation before it) from a string, a message, or a list of messages."""
    if isinstance(value, str):
        return value, []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value or not isinstance(value[-1], dict) or value[-1].get("role") != "assistant":
        raise DataError(f"{where}: {what!r} must be a string or messages ending with an assistant message, got {str(value)[:60]!r}")
    return value[-1].get("content"), value[:-1]


def check_pair(row, where: str) -> Pair:
    """The Pair of one row in TRL's columns; a one-line DataError naming `where` for anything DPO cannot learn from."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise DataError(f"{where}: needs \"chosen\" and \"rejected\" (and \"prompt\" or \"messages\"); "
                        f"got {sorted(row) if isinstance(row, dict) else type(row).__name__}")
    (chosen, before_c), (rejected, before_r) = _answer(row["chosen"], "chosen", where), _answer(row["rejected"], "rejected", where)
    if before_c != before_r:
        raise DataError(f"{where}: \"chosen\" and \"rejected\" hold different conversations before their answers; a pair shares its prompt")
    prompt = before_c or row.get("prompt", row.get("messages"))  # the implicit prompt, when the answers carry it
    if prompt is None:
        raise DataError(f"{where}: no \"prompt\" (or \"messages\"), and the answers carry no conversation before them")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    try:
        template.check_messages(prompt)
        template.check_messages([{"role": "assistant", "content": chosen}, {"role": "assistant", "content": rejected}])
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with the user's turn (the answers reply to it), not {prompt[-1]['role']!r}")
    if not chosen.strip() or not rejected.strip():
        raise DataError(f"{where}: an empty {'chosen' if not chosen.strip() else 'rejected'} answer; every pair needs two answers")
    if chosen == rejected:
        raise DataError(f"{where}: the chosen answer equals the rejected one ({chosen[:40]!r}): nothing to prefer")
    kind = row.get("kind")  # the offline set's own column; TRL ignores extra columns
    return Pair(prompt, chosen, rejected, kind if isinstance(kind, str) else "")


def read_jsonl(path) -> list:
    """Every pair of a JSONL file, checked; the first bad line is a DataError naming file and line."""
    return [check_pair(row, where) for where, row in
            chat_data.jsonl_rows(path, "preference pair", '{"prompt", "chosen", "rejected"} object')]


def hub_pairs(name: str, split: str = "train", limit: int | None = None, **load_kwargs) -> list:
    """The pairs of a Hugging Face dataset with TRL's columns, streamed; an unreachable hub is one line
    (lesson 01's hub_errors), and `name` stays the hub path: "json" with data_files= reads local files."""
    import datasets  # imported here: the offline set never pays for it

    pairs = []
    with corpus.hub_errors(name):
        for i, row in enumerate(datasets.load_dataset(name, split=split, streaming=True, **load_kwargs)):
            if limit is not None and i >= limit:
                break
            pairs.append(check_pair(row, f"{name} row {i}"))
    if not pairs:
        raise DataError(f"{name} split {split!r} holds no pair")
    return pairs


# ---- the offline set: checkable preferences from the plays ----------------------------------------------

def scene_pairs(doc: str, rng: random.Random) -> list:
    """The pairs of one scene, as TRL conversational rows: per speech of two lines or more, a speaker pair
    (when the scene has another character) and a continue pair (when another speech has a line to offer)."""
    if not corpus.HEADING.match(doc):  # cast lists and poems: lesson 08's rule
        return []
    speeches = [(n, ls) for n, ls in instructions.speeches(doc) if not benchmark.ROMAN.fullmatch(n.upper())]
    names = sorted({n for n, _ in speeches})
    out = []
    for s, (speaker, lines) in enumerate(speeches):
        if len(lines) < 2:
            continue
        others = [n for n in names if n != speaker]
        if others:
            out.append(_row("speaker", lines[0], speaker, rng.choice(others)))
        # as in lesson 09, wrong lines come from the answers' own population: lines after a speech's first
        elsewhere = sorted({x for t, (_, ls) in enumerate(speeches) if t != s for x in ls[1:] if x != lines[1]})
        if elsewhere:
            out.append(_row("continue", lines[0], lines[1], rng.choice(elsewhere)))
    return out


def _row(kind: str, line: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": QUESTIONS[kind] + line}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "kind": kind}


def build(corpus_spec="shakespeare", out_dir=DEFAULT_DIR, cache_dir=corpus.DEFAULT_CACHE_DIR, seed: int = 0) -> dict:
    """Write train.jsonl and val.jsonl of the offline set under out_dir (atomically); return the counts."""
    rng, rows = random.Random(seed), {"train": [], "val": []}
    for doc in corpus.documents(corpus_spec, cache_dir):
        rows["val" if prepare.is_val(doc, prepare.DEFAULT_VAL_FRACTION) else "train"] += scene_pairs(doc, rng)
    if not rows["train"] or not rows["val"]:
        raise DataError(f"{corpus_spec} gave {len(rows['train'])} train and {len(rows['val'])} val pairs; "
                        "fix: use a corpus of plays (speaker label on its own line, then the speech)")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name, pairs in rows.items():
        with corpus.atomic_write(Path(out_dir) / f"{name}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return {name: len(pairs) for name, pairs in rows.items()}


def default_data(data_dir: str) -> tuple:
    """(train, val) paths of the offline preference set, built from the default corpus when missing."""
    return chat_data.offline_set(data_dir, build, "preference set", "pair")


def train_val_pairs(data, val_data, hf_dataset, hf_split, hf_limit, data_dir, val_fraction) -> tuple:
    """(train, val) pair lists from --data JSONL files, a hub dataset, or the offline set in data_dir."""
    if hf_dataset:
        pairs = hub_pairs(hf_dataset, hf_split, hf_limit or None)
    elif data:
        pairs = [p for path in data for p in read_jsonl(path)]
    else:
        train_path, val_path = default_data(data_dir)
        pairs, val_data = read_jsonl(train_path), [val_path]
    if val_data:
        return pairs, [p for path in val_data for p in read_jsonl(path)]
    return chat_data.held_out(pairs, val_fraction, "pair")


# ---- token rows out -------------------------------------------------------------------------------------

def encode_pairs(fmt, pairs: list, max_len: int) -> tuple:
    """([(chosen (ids, mask), rejected (ids, mask)) per kept pair], [the kept pairs]); a pair whose longer
    row exceeds max_len tokens is dropped (cutting the prompt could cut the line the answer depends on)."""
    encoded, kept = [], []
    for p in pairs:
        rows = tuple(fmt.encode(p.prompt + [{"role": "assistant", "content": a}]) for a in (p.chosen, p.rejected))
        if max(len(ids) for ids, _ in rows) <= max_len:
            encoded.append(rows)
            kept.append(p)
    return encoded, kept


def collate(encoded: list, pad_id: int) -> tuple:
    """B encoded pairs -> (inputs (2B, T), targets (2B, T)): rows 0..B-1 the chosen answers, B..2B-1 the
    rejected ones; targets are IGNORE (-100) outside the answers (lesson 08's collate)."""
    return chat_data.collate([c for c, _ in encoded] + [r for _, r in encoded], pad_id)


# ---- rejections sampled from the model ------------------------------------------------------------------

@torch.no_grad()
def sample_rejections(model, fmt, pairs: list, samples: int = 4, max_new_tokens: int = 32, temperature: float = 1.0,
                      seed: int = 0) -> tuple:
    """(pairs with a sampled wrong answer as `rejected`, counts): for each pair, up to `samples` answers drawn
    from the model; the first that says something and differs from the chosen answer is kept. A prompt the
    model answers right every time has no mistake to push against and is dropped (counted)."""
    generator = torch.Generator(model.tok_embeddings.weight.device).manual_seed(seed)
    out, counts, B = [], {"kept": 0, "always_right": 0}, model.config.max_batch_size
    todo = [(p, fmt.encode(p.prompt, add_generation_prompt=True)[0]) for p in pairs]
    todo = [(p, ids) for p, ids in todo if len(ids) + max_new_tokens <= model.config.max_seq_len]
    for i in range(0, len(todo), B):
        chunk, wrong = todo[i : i + B], [None] * len(todo[i : i + B])
        for _ in range(samples):
            new = generate.generate(model, [ids for _, ids in chunk], max_new_tokens, temperature=temperature,
                                    stop_id=fmt.eot_id, generator=generator)
            for k, ((p, _), answer) in enumerate(zip(chunk, new)):
                text = fmt.tokenizer.decode(answer)  # the </s> is not text
                if wrong[k] is None and text.strip() and text.strip() != p.chosen.strip() and answer[-1:] == [fmt.eot_id]:
                    wrong[k] = text
        for (p, _), text in zip(chunk, wrong):
            counts["kept" if text else "always_right"] += 1
            if text:
                out.append(p._replace(rejected=text, kind=p.kind + "/sampled" if p.kind else "sampled"))
    return out, counts


def write_jsonl(pairs: list, path) -> None:
    """Pairs as TRL conversational rows (what read_jsonl and TRL's DPOTrainer read), atomically."""
    rows = [{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}], "kind": p.kind} for p in pairs]
    with corpus.atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build the offline preference set, or rejections sampled from an SFT model.")
    parser.add_argument("--out_dir", default=DEFAULT_DIR, help="where train.jsonl / val.jsonl (and sampled_train.jsonl) go")
    parser.add_argument("--sample_from", default=None, help="an SFT checkpoint: its wrong answers become the rejected ones")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the checkpoint, else data/tokenizer.json)")
    parser.add_argument("--samples", type=int, default=4, help="answers drawn per prompt to find a wrong one")
    parser.add_argument("--limit", type=int, default=2048, help="training prompts to sample for (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    args = parser.parse_args(argv)
    train_path, val_path = default_data(args.out_dir)
    with open(train_path) as f:
        first = [json.loads(next(f)) for _ in range(2)]
    for row in first:
        print(f"{row['kind']:<9} {row['prompt'][0]['content']!r}: chosen {row['chosen'][0]['content']!r}, rejected {row['rejected'][0]['content']!r}")
    if args.sample_from:
        chat = import_module("08_sft.chat")
        model = chat.load_chat_model(args.sample_from).eval()
        fmt = template.ChatFormat(tokenizer_lib.load_tokenizer(template.find_tokenizer(args.sample_from, args.tokenizer)))
        pairs = read_jsonl(train_path)
        pairs = random.Random(args.seed).sample(pairs, min(len(pairs), args.limit or len(pairs)))
        sampled, counts = sample_rejections(model, fmt, pairs, args.samples, seed=args.seed)
        write_jsonl(sampled, Path(args.out_dir) / "sampled_train.jsonl")
        print(f"wrote {Path(args.out_dir) / 'sampled_train.jsonl'}: {counts['kept']:,} pairs with a sampled wrong answer, "
              f"{counts['always_right']:,} prompts answered right in all {args.samples} samples (dropped); train with\n"
              f"  python 10_dpo/dpo.py --base {args.sample_from} --data {Path(args.out_dir) / 'sampled_train.jsonl'} --val_data {val_path}")
    checked = read_jsonl(val_path)
    assert all(p.chosen != p.rejected and p.prompt[-1]["role"] == "user" for p in checked)
    print(f"checked: {len(checked):,} validation pairs read back, each with two different answers to a user's turn")


if __name__ == "__main__":
    corpus.exit_on_data_error(main)
