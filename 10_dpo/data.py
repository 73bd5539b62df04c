"""What DPO trains on: pairs of a prompt, a better answer and a worse one, read, checked and turned into rows.

    pair    = (prompt messages, chosen answer, rejected answer, kind)
    rows    = ChatFormat.encode(prompt + [chosen]), ChatFormat.encode(prompt + [rejected])   lesson 08's ids and mask
    collate = P pairs -> inputs (2P, T), targets (2P, T): the P chosen rows, then the P rejected rows (TRL's order)

Rows are TRL's columns, from JSONL files or a Hugging Face dataset (notes.md §4); every problem a user can fix
is a one-line DataError naming the file and line. The offline set asks lesson 08's two questions about lines of
the plays, where the better answer is checkable: "Who says this?" (rejected: another character of the scene) and
"Continue this speech:" (rejected: a line of another speech); validation pairs come from lesson 01's held-out
scenes. --sample_from takes the rejected answers from the SFT model's own mistakes instead.
Left out on purpose: graded preferences, several rejected answers per prompt, prompt truncation.

Demo (writes data/dpo/{train,val}.jsonl):         python 10_dpo/data.py
Rejections sampled from an SFT model instead:      python 10_dpo/data.py --sample_from out/sft/ckpt_best
"""

import argparse
import json
import random
import re
import sys
from importlib import import_module
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
commands = import_module("01_tokenizer.commands")
corpus = import_module("01_tokenizer.corpus")
prepare = import_module("01_tokenizer.prepare")
generate = import_module("06_model.generate")
weights = import_module("06_model.weights")
template = import_module("08_sft.template")
sft_data = import_module("08_sft.data")  # speeches, the JSONL and hub readers, the held-out split, the offline set
sft = import_module("08_sft.sft")  # collate: lesson 08's answer mask

DataError = commands.DataError
DEFAULT_DIR = "data/dpo"
QUESTIONS = {"speaker": "Who says this?\n", "continue": "Continue this speech:\n"}  # lesson 08's wording
ROMAN = re.compile(r"[IVXL]+")  # "Ii", "Iv": act numbers the speech parser can take for labels (lesson 09 skips them too)


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
            sft_data.jsonl_rows(path, "preference pair", '{"prompt", "chosen", "rejected"} object')]


def hub_pairs(name: str, split: str = "train", limit: int | None = None, **load_kwargs) -> list:
    """The pairs of a Hugging Face dataset with TRL's columns, through lesson 08's hub reader and its one-line errors."""
    return sft_data.hub_rows(name, split, limit, check_pair, **load_kwargs)


def pairs_of(cfg: dict) -> tuple:
    """(train, val) pairs of a DPO run's data flags: --data JSONL files, a hub dataset, or the offline set."""
    return sft_data.train_val(cfg, read_jsonl, hub_pairs, default_data, "pair")


def trl_row(prompt: list, chosen: str, rejected: str, kind: str) -> dict:
    """A pair as a TRL conversational row (what read_jsonl and TRL's DPOTrainer read), with its kind."""
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "kind": kind}


# ---- the offline set: checkable preferences from the plays ----------------------------------------------

def scene_pairs(doc: str, rng: random.Random) -> list:
    """The pairs of one scene, as TRL rows: a speaker pair and a continue pair per speech of two lines or more."""
    if not corpus.HEADING.match(doc):  # cast lists and poems: lesson 08's rule
        return []
    speeches = [(n, ls) for n, ls in sft_data.speeches(doc) if not ROMAN.fullmatch(n.upper())]
    names, out = sorted({n for n, _ in speeches}), []
    ask = lambda kind, line: [{"role": "user", "content": QUESTIONS[kind] + line}]
    for s, (speaker, lines) in enumerate(speeches):
        if len(lines) < 2:
            continue
        others = [n for n in names if n != speaker]
        if others:
            out.append(trl_row(ask("speaker", lines[0]), speaker, rng.choice(others), "speaker"))
        # as in lesson 09, wrong lines come from the answers' own population: lines after a speech's first
        elsewhere = sorted({x for t, (_, ls) in enumerate(speeches) if t != s for x in ls[1:] if x != lines[1]})
        if elsewhere:
            out.append(trl_row(ask("continue", lines[0]), lines[1], rng.choice(elsewhere), "continue"))
    return out


def build(corpus_spec="shakespeare", out_dir=DEFAULT_DIR, cache_dir=corpus.DEFAULT_CACHE_DIR, seed: int = 0) -> dict:
    """Write train.jsonl and val.jsonl of the offline set under out_dir (atomically); return the counts."""
    rng, rows = random.Random(seed), {"train": [], "val": []}
    for doc in corpus.documents(corpus_spec, cache_dir):  # lesson 01's rule: the scenes pretraining held out
        rows["val" if prepare.is_val(doc, prepare.DEFAULT_VAL_FRACTION) else "train"] += scene_pairs(doc, rng)
    return sft_data.write_splits(rows, out_dir, "pair", corpus_spec)


def default_data(data_dir: str) -> tuple:
    """(train, val) paths of the offline preference set, built from the default corpus when missing."""
    return sft_data.offline_set(data_dir, build, "preference set", "pair")


# ---- token rows out -------------------------------------------------------------------------------------

def encode_pairs(fmt, pairs: list, max_len: int) -> tuple:
    """([(chosen (ids, mask), rejected (ids, mask))], [pair]) of the pairs whose longer row fits max_len tokens
    (cutting the prompt could cut the line the answer depends on)."""
    encoded, kept = [], []
    for p in pairs:
        rows = tuple(fmt.encode(p.prompt + [{"role": "assistant", "content": a}]) for a in (p.chosen, p.rejected))
        if max(len(ids) for ids, _ in rows) <= max_len:
            encoded.append(rows)
            kept.append(p)
    return encoded, kept


def collate(encoded: list, pad_id: int) -> tuple:
    """P encoded pairs -> (inputs (2P, T), targets (2P, T)) by lesson 08's collate: the P chosen rows first."""
    return sft.collate([c for c, _ in encoded] + [r for _, r in encoded], pad_id)


def prompt_chunks(model, fmt, pairs: list, max_new_tokens: int) -> list:
    """[(pair, prompt ids)] of the pairs whose prompt leaves room for max_new_tokens, in chunks of max_batch_size."""
    todo = [(p, fmt.encode(p.prompt, add_generation_prompt=True)[0]) for p in pairs]
    todo, B = [(p, ids) for p, ids in todo if len(ids) + max_new_tokens <= model.config.max_seq_len], model.config.max_batch_size
    return [todo[i : i + B] for i in range(0, len(todo), B)]


# ---- rejections sampled from the model ------------------------------------------------------------------

@torch.no_grad()
def sample_rejections(model, fmt, pairs: list, samples: int = 4, max_new_tokens: int = 32, seed: int = 0) -> tuple:
    """(pairs with a sampled wrong answer as `rejected`, counts): of up to `samples` answers per prompt, the first
    that says something, ends with </s> and is not the chosen one. A prompt always answered right is dropped."""
    generator = torch.Generator(model.tok_embeddings.weight.device).manual_seed(seed)
    out, tried = [], 0
    for chunk in prompt_chunks(model, fmt, pairs, max_new_tokens):
        wrong = [None] * len(chunk)
        for _ in range(samples):
            new = generate.generate(model, [ids for _, ids in chunk], max_new_tokens, temperature=1.0,
                                    stop_id=fmt.eot_id, generator=generator)
            for k, ((p, _), answer) in enumerate(zip(chunk, new)):
                text = fmt.tokenizer.decode(answer)  # the </s> is not text
                if wrong[k] is None and text.strip() and text.strip() != p.chosen.strip() and answer[-1:] == [fmt.eot_id]:
                    wrong[k] = text
        out += [p._replace(rejected=text, kind=p.kind + "/sampled" if p.kind else "sampled")
                for (p, _), text in zip(chunk, wrong) if text]
        tried += len(chunk)
    return out, {"kept": len(out), "always_right": tried - len(out)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build the offline preference set, or rejections sampled from an SFT model.")
    parser.add_argument("--out_dir", default=DEFAULT_DIR, help="where train.jsonl / val.jsonl (and sampled_train.jsonl) go")
    parser.add_argument("--sample_from", help="an SFT checkpoint: its wrong answers become the rejected ones")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: beside the checkpoint, else data/tokenizer.json)")
    parser.add_argument("--samples", type=int, default=4, help="answers drawn per prompt to find a wrong one")
    parser.add_argument("--limit", type=int, default=2048, help="training prompts to sample for (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    args = parser.parse_args(argv)
    train_path, val_path = default_data(args.out_dir)
    pairs = read_jsonl(train_path)
    for p in pairs[:2]:
        print(f"{p.kind:<9} {p.prompt[0]['content']!r}: chosen {p.chosen!r}, rejected {p.rejected!r}")
    if args.sample_from:
        model, tok, _ = weights.load_pair(args.sample_from, args.tokenizer)  # the tokenizer checked against its record
        pairs = random.Random(args.seed).sample(pairs, min(len(pairs), args.limit or len(pairs)))
        sampled, counts = sample_rejections(model.eval(), template.ChatFormat(tok), pairs, args.samples, seed=args.seed)
        out = Path(args.out_dir) / "sampled_train.jsonl"
        with commands.atomic_write(out) as tmp:
            tmp.write_text("".join(json.dumps(trl_row(*p)) + "\n" for p in sampled))
        print(f"wrote {out}: {counts['kept']:,} pairs with a sampled wrong answer, {counts['always_right']:,} prompts "
              f"answered right in all {args.samples} samples (dropped); train with\n"
              f"  python 10_dpo/dpo.py --base {args.sample_from} --data {out} --val_data {val_path}")
    checked = read_jsonl(val_path)
    assert all(p.chosen != p.rejected and p.prompt[-1]["role"] == "user" for p in checked)
    print(f"checked: {len(checked):,} validation pairs read back, each with two different answers to a user's turn")


if __name__ == "__main__":
    with weights.one_line_errors():
        main()
