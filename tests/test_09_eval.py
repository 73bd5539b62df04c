"""Lesson 09: bits per byte by hand, log-likelihood scoring, the benchmark's data, agreement with lm-evaluation-harness, the CLI.

Run: python -m pytest tests/test_09_eval.py -q
"""

import json
import math
import random
import re
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

lillm = import_module("06_model.model")
weights = import_module("06_model.weights")
tokenizer_lib = import_module("01_tokenizer.tokenizer")
corpus = import_module("01_tokenizer.corpus")
prepare = import_module("01_tokenizer.prepare")
train = import_module("07_pretrain_ddp.train")
template = import_module("08_sft.template")
score = import_module("09_eval.score")
bench_data = import_module("09_eval.data")
evaluation = import_module("09_eval.eval")
harness = import_module("09_eval.harness")

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["HAMLET", "HORATIO", "OPHELIA", "KING CLAUDIUS", "LAERTES", "FIRST PLAYER"]
WORDS = "the king ghost night watch castle sword crown poison grave friend mother sleep dream death love".split()

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def plays(n_plays: int = 2, n_scenes: int = 12, seed: int = 0) -> list:
    """Documents in the default corpus's layout: per play a cast list, then scenes of labelled speeches.
    Every line starts with a number that makes it unique, so a line is in exactly one scene."""
    rng, docs, n = random.Random(seed), [], 0
    for p in range(n_plays):
        docs.append(f"THE TRAGEDY OF PLAY {p}\n\nPersons represented:\n\n" + "\n".join(NAMES))
        for s in range(n_scenes):
            blocks = [f"SCENE {'I' * (s % 3 + 1)}. A room in the castle, {p}-{s}.", "[Enter HAMLET.]"]
            for _ in range(rng.randint(6, 10)):
                lines = []
                for _ in range(rng.randint(1, 3)):
                    n += 1
                    lines.append(f"Line {n} " + " ".join(rng.choices(WORDS, k=rng.randint(3, 6))) + ",")
                blocks.append("\n".join([rng.choice(NAMES) + ".", *lines]))
            docs.append("\n\n".join(blocks) + "\n\n[Exeunt.]")
    return docs


VAL_FRACTION = 0.4  # the fake corpus is small: a larger share of validation scenes than lesson 01's 0.05


def tiny_config(**overrides):
    base = dict(vocab_size=400, d_model=64, n_layers=2, max_seq_len=128, q_heads=4, kv_heads=2, multiple_of=32)
    return lillm.ModelConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def docs():
    return plays()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, docs):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer_lib.save_tokenizer(tokenizer_lib.train_tokenizer(docs + ["Who says this?\nContinue this speech:"], vocab_size=400), path)
    return path


@pytest.fixture(scope="module")
def tok(tok_path):
    return tokenizer_lib.load_tokenizer(tok_path)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory, docs):
    out = tmp_path_factory.mktemp("bench")
    bench_data.build(out, docs=docs, val_fraction=VAL_FRACTION, max_items=60)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, docs, tok):
    """A tiny model trained for 60 steps on the training scenes: its outputs are far from uniform."""
    torch.manual_seed(0)
    ids = [i for d in docs if not prepare.is_val(d, VAL_FRACTION) for i in tok.encode(d).ids + [tokenizer_lib.EOT_ID]]
    data, T = torch.tensor(ids), 64
    model = lillm.LilLM(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        starts = torch.randint(0, len(data) - T - 1, (16,))
        x = torch.stack([data[s : s + T] for s in starts])
        y = torch.stack([data[s + 1 : s + T + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 4.0, f"the tiny model did not learn (loss {loss.item():.2f}; ln 400 = 5.99)"
    path = tmp_path_factory.mktemp("ckpt") / "ckpt_best"
    path.mkdir()
    weights.save_model(model, path / "model.safetensors")
    return model.eval(), path


# ---- bits per byte -----------------------------------------------------------------------------------------

def test_bits_per_byte_by_hand_with_special_tokens(tok, tok_path, tmp_path):
    torch.manual_seed(0)
    model = lillm.LilLM(tiny_config()).eval()
    text = "The king 12,</s>Sleep and dream.</s><s>"
    ids = torch.tensor([tok.encode(text).ids])  # (1, n): specials inside the text become their ids
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        logp = torch.log_softmax(model(x)[0].double(), -1)[0]  # (n-1, V)
    nats = -sum(logp[t, y[0, t]].item() for t in range(y.shape[1]))  # every target, </s> and <s> included
    n_bytes = len(tok.decode(y[0].tolist(), skip_special_tokens=True).encode())  # specials spell 0 bytes
    lengths = tokenizer_lib.token_byte_lengths(tok, model.config.vocab_size)
    # By hand: the text's bytes without its specials, less those of the first token (an input, never a target).
    assert n_bytes == len("The king 12,Sleep and dream.".encode()) - lengths[ids[0, 0]].item()
    # eval.py's bpb of a val.bin holding exactly this text: one window, the same targets.
    np.asarray(ids[0].tolist(), dtype=np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer_sha256": tokenizer_lib.tokenizer_sha256(tok_path)}))
    assert evaluation.val_bpb(model, tok, tok_path, tmp_path) == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    # A uniform model pays ln V nats for every target, special or not: bpb = n ln V / (ln 2 * bytes).
    uniform = Favours(torch.zeros(model.config.vocab_size))
    assert evaluation.val_bpb(uniform, tok, tok_path, tmp_path) == pytest.approx(y.numel() * math.log(400) / (math.log(2) * n_bytes))
    # Sums, then one division: two batches add up (nats, bytes, target tokens), and a masked target counts nothing.
    masked = y.clone()
    masked[0, 0] = train.IGNORE
    sums = train.loss_sums(model, [(x, y), (x, masked)], lengths)
    first = lengths[y[0, 0]].item()
    assert sums.tolist() == pytest.approx([2 * nats + logp[0, y[0, 0]].item(), 2 * n_bytes - first, 2 * y.numel() - 1])


def test_bits_per_byte_on_a_hand_sized_tokenizer():
    """notes.md §1's smallest example: 256 byte tokens + "Ġthe" + </s>; " the", one byte of é, </s> are 4 + 1 + 0
    bytes, and a uniform model over the 258 tokens pays ln 258 nats for each of the 3 targets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bpe = import_module("01_tokenizer.bpe")
    vocab = {c: i for i, c in enumerate(bpe.BYTE_TO_CHAR.values())} | {"Ġthe": 256}
    hand = Tokenizer(models.BPE(vocab, merges=[]))
    hand.pre_tokenizer, hand.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hand.add_special_tokens(["</s>"])
    lengths = tokenizer_lib.token_byte_lengths(hand)
    the, e_acute, eos = 256, vocab[bpe.to_byte_chars("é")[0]], 257  # "é" is two bytes, 0xC3 0xA9
    assert (lengths[the], lengths[e_acute], lengths[eos]) == (4, 1, 0)
    y = torch.tensor([[the, e_acute, eos]])
    nats, n_bytes, tokens = train.loss_sums(Favours(torch.zeros(len(lengths))), [(torch.zeros_like(y), y)], lengths).tolist()
    assert (n_bytes, tokens) == (5, 3)
    bpb = nats / (math.log(2) * n_bytes)
    assert bpb == pytest.approx(3 * math.log(258) / (math.log(2) * 5)) and round(bpb, 3) == 4.807


def test_token_file_batches_make_every_token_a_target_once(tmp_path, tok):
    ids = tok.encode(" ".join(plays(1, 2)[1:])).ids + [tokenizer_lib.EOT_ID]
    path = tmp_path / "val.bin"
    np.asarray(ids, dtype=np.uint16).tofile(path)
    batches = list(evaluation.token_file_batches(path, seq_len=16, batch_size=3))
    targets = [t for _, y in batches for t in y.flatten().tolist() if t != train.IGNORE]
    assert targets == ids[1:]


# ---- log-likelihood scoring ----------------------------------------------------------------------------------

class Favours(torch.nn.Module):
    """A stub LM whose next-token distribution is fixed: log p(token) is set by construction."""

    def __init__(self, logp: torch.Tensor):
        super().__init__()
        self.config = tiny_config(vocab_size=len(logp))
        self.tok_embeddings = torch.nn.Embedding(1, 1)
        self.layers, self.logp = [], logp

    def forward(self, tokens, start_pos=0, caches=None):
        return self.logp.expand(*tokens.shape, -1), None


def test_scorer_picks_the_choice_given_the_highest_log_probability():
    logp = torch.log_softmax(torch.tensor([0.0, 0.0, 3.0, 1.0, -2.0]), -1)  # token 2 is the likeliest
    model = Favours(logp)
    choices = [[3], [2], [4], [3, 3]]
    for share in (True, False):
        lls = [ll for ll, _ in score.loglikelihoods(model, [([0], c) for c in choices], share_prefix=share)]
        assert lls == pytest.approx([logp[c].sum().item() for c in choices])
        assert score.predict(lls, [1, 1, 1, 2], [1, 1, 1, 2])["acc"] == 1
    # The normalizations: a long answer whose tokens are each likelier loses on the sum, wins per token / byte.
    lls, n_tokens, n_bytes = [-4.0, -6.0], [2, 6], [8, 24]
    assert score.predict(lls, n_tokens, n_bytes) == {"acc": 0, "acc_token": 1, "acc_bytes": 1}
    assert score.centered(0.25, 0.25) == 0 and score.centered(1.0, 0.25) == 1


def test_a_continuation_longer_than_the_window_is_a_one_line_error():
    """Context [5] and a 129-token choice with max_seq_len 128 was a raw RuntimeError from gather; 128 tokens still fit."""
    model = lillm.LilLM(tiny_config(vocab_size=50, max_seq_len=128)).eval()
    for share in (True, False):
        with pytest.raises(ValueError, match="continuation of 129 tokens is longer than the model's window of 128"):
            score.loglikelihoods(model, [([5], [7] * 129)], share_prefix=share)
        (ll, _), = score.loglikelihoods(model, [([5], [7] * 128)], share_prefix=share)
        assert ll < 0


@given(seed=st.integers(0, 2**16), n_groups=st.integers(1, 4), batch_size=st.integers(1, 7))
def test_batching_and_prefix_sharing_change_no_score(seed, n_groups, batch_size):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = lillm.LilLM(tiny_config(vocab_size=50, max_seq_len=24)).eval()
    requests = []
    for _ in range(n_groups):  # choices of one item share its context; some inputs overflow max_seq_len
        ctx = [rng.randrange(50) for _ in range(rng.randint(1, 22))]
        requests += [(ctx, [rng.randrange(50) for _ in range(rng.randint(1, 6))]) for _ in range(rng.randint(1, 4))]
    one_by_one = score.loglikelihoods(model, requests, batch_size=1, share_prefix=False)
    for share in (True, False):
        got = score.loglikelihoods(model, requests, batch_size=batch_size, share_prefix=share)
        assert [g for _, g in got] == [g for _, g in one_by_one]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in one_by_one], abs=1e-4)


def test_greedy_exact_match_is_the_harness_is_greedy_test(trained, tok, bench_dir):
    model, _ = trained
    items = bench_data.load_task(bench_dir / "last_word.jsonl")
    requests = [evaluation.exact_request(it, tok) for it in items]
    greedy = [g for _, g in score.loglikelihoods(model, requests)]
    assert score.greedy_matches(model, *map(list, zip(*requests))) == greedy


# ---- the benchmark -------------------------------------------------------------------------------------------

def test_benchmark_build_is_deterministic_and_only_from_validation_scenes(tmp_path, docs, bench_dir):
    meta = bench_data.build(tmp_path, docs=docs, val_fraction=VAL_FRACTION, max_items=60)
    for task, info in meta["tasks"].items():
        assert (tmp_path / f"{task}.jsonl").read_bytes() == (bench_dir / f"{task}.jsonl").read_bytes()
        assert info["items"] > 20
    # Every line of the fake corpus starts with its own number: the numbers an item shows name the lines it drew.
    val = {n for d in docs if prepare.is_val(d, VAL_FRACTION) for n in re.findall(r"Line (\d+) ", d)}
    for task in bench_data.TASKS:
        for item in bench_data.load_task(tmp_path / f"{task}.jsonl"):
            shown = re.findall(r"Line (\d+) ", item["context"] + "".join(item.get("choices", [])))
            assert shown and set(shown) <= val, item["id"]


def test_default_corpus_gives_500_items_per_task_from_validation_scenes(tmp_path):
    """On the real corpus (downloaded once into data/cache, as lesson 01's tests do)."""
    meta = bench_data.build(tmp_path, cache_dir=ROOT / corpus.DEFAULT_CACHE_DIR)
    assert all(info["items"] >= 500 for info in meta["tasks"].values()), meta["tasks"]
    val = [d for d in corpus.documents("shakespeare", ROOT / corpus.DEFAULT_CACHE_DIR) if prepare.is_val(d, 0.05)]
    val_lines = {line.strip() for d in val for line in d.splitlines()}
    for item in bench_data.load_task(tmp_path / "next_line.jsonl"):
        assert all(c in val_lines for c in item["choices"])


def test_chat_form_uses_the_template_and_scores_the_answer_with_its_end_of_turn(tok, bench_dir):
    fmt = template.ChatFormat(tok)
    item = bench_data.load_task(bench_dir / "speaker.jsonl")[0]
    (prompt, answer), *_ = evaluation.requests_of(item, tok, fmt)[0]
    assert prompt == fmt.encode(item["chat"]["messages"], add_generation_prompt=True)[0]
    assert answer == tok.encode(item["chat"]["choices"][0]).ids + [fmt.eot_id]


# ---- agreement with lm-evaluation-harness -----------------------------------------------------------------------

def test_lilLM_scorer_and_lm_eval_pick_the_same_choice_on_every_item(trained, tok, tok_path, bench_dir, tmp_path):
    pytest.importorskip("lm_eval")
    model, ckpt = trained
    hf_dir = harness.export(ckpt, tok_path, tmp_path / "hf")
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["pad_token"] == "</s>"
    results = harness.run(hf_dir, bench_dir=bench_dir, batch_size=8)
    for name, spec in bench_data.TASKS.items():
        items = bench_data.load_task(bench_dir / f"{name}.jsonl")
        theirs = sorted(results["samples"][f"lillm_{name}"], key=lambda s: s["doc_id"])
        assert len(theirs) == len(items)
        ours = evaluation.evaluate_task(model, tok, items, spec["kind"])
        if spec["kind"] == "exact":
            assert ours["predictions"] == [int(s["acc"]) for s in theirs]
            assert ours["exact"] == pytest.approx(results["results"][f"lillm_{name}"]["acc,none"])
            continue
        for item, picked, s in zip(items, ours["predictions"], theirs):
            lls = [float(r[0]) for r in s["filtered_resps"]]
            assert picked["acc"] == score.argmax(lls), item["id"]
            assert picked["acc_bytes"] == score.argmax([ll / len(c.encode()) for ll, c in zip(lls, item["choices"])]), item["id"]
            # The harness has no per-token rule; its continuation tokens are ours, so their count divides its sums.
            n_tokens = [len(cont) for _, cont in evaluation.requests_of(item, tok)[0]]
            assert picked["acc_token"] == score.argmax([ll / m for ll, m in zip(lls, n_tokens)]), item["id"]
        for metric in ("acc", "acc_bytes"):
            assert ours[metric] == pytest.approx(results["results"][f"lillm_{name}"][f"{metric},none"])
        # acc_norm divides by characters, acc_bytes by bytes: the same on ASCII text (which this corpus is).
        assert all(c.isascii() for it in items for c in it["choices"])
        assert results["results"][f"lillm_{name}"]["acc_norm,none"] == results["results"][f"lillm_{name}"]["acc_bytes,none"]


# ---- the command and its errors ---------------------------------------------------------------------------------

def test_eval_command_prints_the_table_and_writes_eval_json(trained, tok, tok_path, docs, bench_dir, tmp_path, capsys):
    _, ckpt = trained
    ids = [i for d in docs if prepare.is_val(d, VAL_FRACTION) for i in tok.encode(d).ids + [tokenizer_lib.EOT_ID]]
    np.asarray(ids, dtype=np.uint16).tofile(tmp_path / "val.bin")  # lesson 01's token files, as far as bpb reads them
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer_sha256": tokenizer_lib.tokenizer_sha256(tok_path)}))
    report = evaluation.main(["--checkpoint", str(ckpt), "--tokenizer", str(tok_path), "--bench_dir", str(bench_dir),
                              "--data_dir", str(tmp_path), "--form", "base"])
    out = capsys.readouterr().out
    assert "task" in out and "centered" in out and all(name in out for name in bench_data.TASKS)
    assert 0 < report["val_bpb"] < math.log2(400) and "bits per byte" in out
    saved = json.loads((ckpt / "eval.json").read_text())
    assert saved["tasks"]["speaker"]["accuracy"] == report["tasks"]["speaker"]["accuracy"]
    assert saved["benchmark"]["tasks"]["speaker"]["sha256"]
    # A checkpoint whose run carries a chat template (lesson 08 writes chat_template.jinja) is read in chat form.
    sft = tmp_path / "sft" / "ckpt_best"
    sft.mkdir(parents=True)
    (sft / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    (sft.parent / "chat_template.jinja").write_text(template.CHAT_TEMPLATE)
    chat = evaluation.main(["--checkpoint", str(sft), "--tokenizer", str(tok_path), "--bench_dir", str(bench_dir),
                            "--data_dir", str(tmp_path), "--tasks", "speaker", "--limit", "4"])
    assert chat["form"] == "chat" and chat["val_bpb"] is None and chat["tasks"]["speaker"]["metric"] == "acc_token"


def one_line_error(capsys, main, argv, last_line: bool = False) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    if last_line:  # libraries may log before it (transformers' "Loading weights"); the error itself is one line
        err = err.splitlines()[-1]
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_inputs_give_one_line_errors(trained, tok_path, bench_dir, tmp_path, capsys, monkeypatch):
    _, ckpt = trained
    common = ["--tokenizer", str(tok_path), "--bench_dir", str(bench_dir)]
    assert "no checkpoint" in one_line_error(capsys, evaluation.main, ["--checkpoint", str(tmp_path / "nope"), *common])
    small = tmp_path / "small.safetensors"  # a model whose vocab is smaller than the tokenizer's
    weights.save_model(lillm.LilLM(tiny_config(vocab_size=300)), small)
    assert "tokens" in one_line_error(capsys, evaluation.main, ["--checkpoint", str(small), *common])
    empty = tmp_path / "bench"
    empty.mkdir()
    (empty / "meta.json").write_text("{}")
    (empty / "speaker.jsonl").write_text("")
    err = one_line_error(capsys, evaluation.main, ["--checkpoint", str(ckpt), "--tokenizer", str(tok_path),
                                                  "--bench_dir", str(empty), "--tasks", "speaker"])
    assert "no items" in err
    assert "no task file" in one_line_error(capsys, evaluation.main, ["--checkpoint", str(ckpt), "--tokenizer", str(tok_path),
                                                                     "--bench_dir", str(empty), "--tasks", "next_line"])
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network in the test run: the hub fails at once
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    err = one_line_error(capsys, harness.main, ["--checkpoint", str(ckpt), *common, "--tasks", "hellaswag", "--limit", "2"], last_line=True)
    assert "hub" in err
