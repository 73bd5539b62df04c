"""Lesson 10: the DPO loss against its closed form and TRL, the reference, the pairs, and DPO runs.

What is proved: with policy == reference the loss is ln 2 and every reward 0; the loss is the closed form
-log sigmoid(beta (log-ratio chosen - log-ratio rejected)) on drawn log-probs; TRL's DPOTrainer gives the
same loss, rewards, accuracy and margin on the same weights and pairs (and the same ids and answer mask);
one step raises the margin; prompt tokens get no gradient; the reference never changes (with LoRA,
the SFT weights stay bit for bit); 2 torchrun processes == 1; a stopped and resumed run == an unbroken one;
LoRA adapters are a valid --base (loaded merged); bad pairs and a mismatched tokenizer are one-line errors.

The tokenizer, the scenes (each speaker with words of their own, so who speaks is learnable) and the
SFT model (08's sft.py for a few steps on a tiny base) are made here.

Run: python -m pytest tests/test_10_dpo.py -q
"""

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest
import torch
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

lillm = import_module("06_model.model")
weights = import_module("06_model.weights")
hf = import_module("06_model.hf")
tokenizer_lib = import_module("01_tokenizer.tokenizer")
DataError = import_module("01_tokenizer.corpus").DataError
train = import_module("07_pretrain_ddp.train")
stage = import_module("07_pretrain_ddp.stage")
template = import_module("08_sft.template")
lora = import_module("08_sft.lora")
sft_data = import_module("08_sft.data")
sft = import_module("08_sft.sft")
dpo_data = import_module("10_dpo.data")
dpo = import_module("10_dpo.dpo")

ROOT = Path(__file__).resolve().parents[1]
VOICES = {"HAMLET.": "night ghost castle sword", "OPHELIA.": "flower river song sweet", "Hor.": "watch friend sir speak",
          "KING CLAUDIUS.": "crown poison throne brother"}  # each speaker's own words: who speaks is learnable

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def scene(n_speeches: int, seed: int) -> str:
    """A scene in the default corpus's layout; each line mostly in its speaker's words."""
    rng = random.Random(seed)
    blocks = ["SCENE I. Elsinore. A platform before the castle.", "[Enter Hamlet and Horatio.]"]
    for _ in range(n_speeches):
        label = rng.choice(list(VOICES))
        words = VOICES[label].split() + ["the", "and", "my"]
        lines = [" ".join(rng.choices(words, k=rng.randint(3, 5))).capitalize() + "," for _ in range(rng.randint(2, 3))]
        blocks.append("\n".join([label, *lines]))
    return "\n\n".join(blocks) + "\n\n[Exeunt.]\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """tokenizer.json, a tiny SFT checkpoint (sft/ckpt_best, 08's format) and pairs {train,val}.jsonl."""
    root = tmp_path_factory.mktemp("dpo")
    docs = [scene(40, s) for s in range(4)] + ["Who says this?\nContinue this speech:\nAnd how does it go on?"]
    tokenizer_lib.save_tokenizer(tokenizer_lib.train_tokenizer(docs, vocab_size=300), root / "tokenizer.json")
    torch.manual_seed(0)
    weights.save_model(lillm.LilLM(tiny_config()), root / "base.safetensors")
    rng = random.Random(0)
    convs = [c for s in range(10, 16) for c in sft_data.conversations(scene(30, s), rng)]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convs))
    sft.main(["--base", str(root / "base.safetensors"), "--tokenizer", str(root / "tokenizer.json"), "--data", str(root / "chats.jsonl"),
              "--out_dir", str(root / "sft"), "--max_steps", "12", "--warmup_steps", "2", "--lr", "3e-3", "--batch_size", "4",
              "--eval_interval", "12", "--eval_prompts", "1", "--answer_tokens", "4", "--device", "cpu"])
    shutil.copyfile(root / "tokenizer.json", root / "sft" / "ckpt_best" / "tokenizer.json")
    for name, seeds in (("train", range(20, 32)), ("val", range(2))):
        rows = [r for s in seeds for r in dpo_data.scene_pairs(scene(30, s), random.Random(s))]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tiny_config(**overrides):
    base = dict(vocab_size=300, d_model=64, n_layers=2, max_seq_len=96, q_heads=4, kv_heads=2, multiple_of=32)
    return lillm.ModelConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def fmt(root):
    return template.ChatFormat(tokenizer_lib.load_tokenizer(root / "tokenizer.json"))


@pytest.fixture(scope="module")
def pairs(root, fmt):
    """Eight encoded training pairs and the pairs themselves."""
    kept = dpo_data.read_jsonl(root / "train.jsonl")[:8]
    encoded, kept = dpo_data.encode_pairs(fmt, kept, 96)
    return encoded, kept


def sft_model(root):
    return weights.load_model(root / "sft" / "ckpt_best")


def batch_of(model, encoded, fmt):
    """(inputs, targets, reference log-probs) with `model` as the reference, as dpo.py caches them."""
    x, y = dpo_data.collate(encoded, fmt.eot_id)
    with torch.no_grad():
        return x, y, dpo.sequence_logps(model.eval(), x, y)


# ---- the loss ------------------------------------------------------------------------------------------

def test_at_initialization_the_loss_is_ln2_and_the_rewards_zero(root, fmt, pairs):
    logps = torch.randn(2, 16).double() * 20 - 40
    losses, chosen, rejected = dpo.dpo_loss(logps[0], logps[1], logps[0], logps[1], beta=0.1)
    assert torch.equal(losses, torch.full_like(losses, math.log(2))) and not chosen.any() and not rejected.any()
    model = sft_model(root)  # the policy IS the reference: the same model, the same batch
    batch = batch_of(model, pairs[0], fmt)
    loss, figures = dpo.DPOObjective(beta=0.5).loss_sum(model, batch)
    assert loss.item() / len(pairs[0]) == pytest.approx(math.log(2), abs=1e-6)
    assert all(figures[k].item() == 0 for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"))


@given(P=st.integers(1, 8), beta=st.floats(0.01, 2.0), seed=st.integers(0, 2**16))
def test_the_loss_is_the_closed_form(P, beta, seed):
    """-log sigmoid(z) = log(1 + e^-z), z = beta ((pi_w - ref_w) - (pi_l - ref_l)), written with math, not torch."""
    g = torch.Generator().manual_seed(seed)
    pw, pl, rw, rl = (-60 * torch.rand(P, generator=g, dtype=torch.float64) for _ in range(4))
    losses, chosen, rejected = dpo.dpo_loss(pw, pl, rw, rl, beta)
    for k in range(P):
        z = beta * ((pw[k] - rw[k]) - (pl[k] - rl[k])).item()
        expected = math.log1p(math.exp(-z)) if z > 0 else -z + math.log1p(math.exp(z))
        assert losses[k].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert chosen[k].item() == pytest.approx(beta * (pw[k] - rw[k]).item(), rel=1e-12)
        assert rejected[k].item() == pytest.approx(beta * (pl[k] - rl[k]).item(), rel=1e-12)


def test_the_loss_and_rewards_equal_trls_dpo_trainer(root, fmt, tmp_path):
    """TRL's DPOTrainer on the Hugging Face exports of the same policy and reference, on the same pairs:
    its tokenization and answer mask are lesson 08's, and its loss and logged rewards are this lesson's."""
    trl = pytest.importorskip("trl")  # a test dependency (pyproject.toml); skipped with this reason where absent
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in (root / "val.jsonl").read_text().splitlines()[:6]]
    reference = sft_model(root)
    policy = sft_model(root)
    with torch.no_grad():  # a policy that has moved: random nudges to every weight
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    dirs = [hf.export_hf(m, root / "tokenizer.json", tmp_path / name, chat_template=template.CHAT_TEMPLATE)
            for m, name in ((policy, "policy"), (reference, "reference"))]
    tok = AutoTokenizer.from_pretrained(str(dirs[0]))
    beta = 0.3
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), beta=beta, report_to=[],
                     use_cpu=True, bf16=False, max_steps=1, save_strategy="no", max_length=None)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(dirs[0])), ref_model=AutoModelForCausalLM.from_pretrained(str(dirs[1])),
                         args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))  # rows shuffled: compared as sets and means
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch).item()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}  # what TRL logs for this batch

    encoded, kept = dpo_data.encode_pairs(fmt, [dpo_data.check_pair(r, "val") for r in rows], 96)
    ours = sorted(tuple(ids) + (-1,) + tuple(mask) for rows_ in encoded for ids, mask in rows_)
    theirs = sorted(tuple(ids[m.bool()].tolist()) + (-1,) + tuple(c[m.bool()].bool().tolist())
                    for ids, m, c in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]))
    assert ours == theirs  # the same ids, and the same trained positions (answer + </s>)
    x, y = dpo_data.collate(encoded, fmt.eot_id)
    with torch.no_grad():
        ref = dpo.sequence_logps(reference.eval(), x, y)
        loss, figures = dpo.DPOObjective(beta).loss_sum(policy.eval(), (x, y, ref))
    P = len(kept)
    assert loss.item() / P == pytest.approx(trl_loss, abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert figures[name].item() / P == pytest.approx(logged[name], abs=1e-4), name
    assert figures["rewards/margins"].abs() > 1e-3  # the comparison is not between zeros


# ---- the step, the mask, the reference -----------------------------------------------------------------

class LogitSpy(torch.nn.Module):
    """The model, keeping its logits' gradient: which positions the loss reads."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        logits, _ = self.model(tokens)
        logits.retain_grad()
        self.logits = logits
        return logits, None


def test_one_step_raises_the_margin_and_prompt_tokens_get_no_gradient(root, fmt, pairs):
    model = sft_model(root).train()
    batch = batch_of(model, pairs[0], fmt)
    objective, run = dpo.DPOObjective(beta=0.1), stage.Run(False, 0, 0, 1, torch.device("cpu"))
    spy = LogitSpy(model)
    loss, _ = objective.loss_sum(spy, batch)
    loss.backward()
    answer = batch[1] != dpo.IGNORE  # (2P, T): positions whose next token is an answer token (or its </s>)
    grad = spy.logits.grad.abs().sum(-1)  # (2P, T)
    assert (grad[~answer] == 0).all() and (grad[answer] > 0).all()
    model.zero_grad(set_to_none=True)
    optimizer = train.make_optimizer(model, 1e-3, 0.0, run.device)
    train.train_step(model, model, optimizer, [batch], run, 1.0, torch.autocast("cpu", enabled=False), objective)
    with torch.no_grad():
        _, after = objective.loss_sum(model, batch)
    assert after["rewards/margins"] > 0 and after["rewards/accuracies"] > len(pairs[0]) / 2, after


def test_the_reference_never_changes(root, fmt, pairs):
    """Full fine-tuning trains the very model that computed the cached reference; the SFT checkpoint is untouched,
    and a fresh load of it (the closing KL's reference) gives the cached log-probs exactly. With LoRA the base weights
    stay bit for bit, and the policy merged (as the closing figures load it) gives the trained policy's log-probs."""
    path = root / "sft" / "ckpt_best" / "model.safetensors"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    run = stage.Run(False, 0, 0, 1, torch.device("cpu"))
    for use_lora in (False, True):
        model = sft_model(root)
        batch = batch_of(model, pairs[0], fmt)
        if use_lora:
            lora.apply_lora(model, 4, 8.0, ["wq", "wv", "w2"])
        optimizer = train.make_optimizer(model, 1e-2, 0.0, run.device)
        for _ in range(3):
            train.train_step(model, model, optimizer, [batch], run, 1.0, torch.autocast("cpu", enabled=False), dpo.DPOObjective(0.1))
        with torch.no_grad():
            moved = dpo.sequence_logps(model.eval(), batch[0], batch[1])
            assert (moved - batch[2]).abs().max() > 1e-3  # the policy moved
            if use_lora:
                sft_state = sft_model(root).state_dict()
                assert all(torch.equal(v, sft_state[k]) for k, v in model.state_dict().items() if ".lora_" not in k)
                assert_close(dpo.sequence_logps(lora.merge_lora(model), batch[0], batch[1]), moved, atol=1e-4, rtol=1e-5)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert torch.equal(batch_of(sft_model(root), pairs[0], fmt)[2], batch[2])  # recomputed: the cache is the reference


# ---- pairs: formats and checks -------------------------------------------------------------------------

USER = [{"role": "user", "content": "Who says this?\nNight ghost"}]
GOOD = [
    {"prompt": "Who says this?\nNight ghost", "chosen": "Hamlet", "rejected": "Ophelia"},  # standard
    {"prompt": USER, "chosen": [{"role": "assistant", "content": "Hamlet"}], "rejected": [{"role": "assistant", "content": "Ophelia"}]},
    {"messages": USER, "chosen": "Hamlet", "rejected": "Ophelia"},
    {"prompt": "Who says this?\nNight ghost", "chosen": USER + [{"role": "assistant", "content": "Hamlet"}],  # UltraFeedback's form
     "rejected": USER + [{"role": "assistant", "content": "Ophelia"}]},
]


@pytest.mark.parametrize("row", GOOD)
def test_trl_formats_give_the_same_pair(row):
    assert dpo_data.check_pair(row, "x") == dpo_data.Pair(USER, "Hamlet", "Ophelia", "")


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "q", "chosen": "a"}, 'needs "chosen" and "rejected"'),
    ({"chosen": "a", "rejected": "b"}, 'no "prompt"'),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty chosen answer"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "empty rejected answer"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "equals the rejected"),
    ({"prompt": [{"role": "assistant", "content": "q"}], "chosen": "a", "rejected": "b"}, "end with the user's turn"),
    ({"chosen": USER + [{"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "other"},
                                                                              {"role": "assistant", "content": "b"}]}, "different conversations"),
    ({"prompt": "q", "chosen": "a</s><r1>", "rejected": "b"}, "forge"),
])
def test_bad_pairs_are_refused_with_the_reason(row, problem):
    with pytest.raises(DataError, match=problem) as e:
        dpo_data.check_pair(row, "pairs.jsonl:3")
    assert str(e.value).startswith("pairs.jsonl:3: ") and "\n" not in str(e.value)


def test_offline_pairs_have_a_checkable_better_answer():
    doc = scene(30, 0)
    speeches = sft_data.speeches(doc)
    rows = dpo_data.scene_pairs(doc, random.Random(0))
    names, lines = {n for n, _ in speeches}, {ln for _, ls in speeches for ln in ls}
    for row in map(lambda r: dpo_data.check_pair(r, "scene"), rows):
        assert row.kind in ("speaker", "continue") and row.chosen != row.rejected
        first = row.prompt[0]["content"].split("\n", 1)[1]
        speech = next(ls for n, ls in speeches if ls[0] == first)
        if row.kind == "speaker":
            assert row.rejected in names and next(n for n, ls in speeches if ls[0] == first) == row.chosen
        else:
            assert row.chosen == speech[1] and row.rejected in lines and row.rejected not in speech[:2]


def test_hub_path_reads_trl_columns(root):
    """The hub reader through `datasets` (its json builder on a local file: the hub is unreachable here)."""
    assert dpo_data.hub_pairs("json", data_files=str(root / "val.jsonl")) == dpo_data.read_jsonl(root / "val.jsonl")


def test_sampled_rejections_are_the_models_wrong_answers(root, fmt):
    model = sft_model(root).eval()
    pairs = dpo_data.read_jsonl(root / "val.jsonl")[:6]
    sampled, counts = dpo_data.sample_rejections(model, fmt, pairs, samples=2, max_new_tokens=8, seed=0)
    assert counts["kept"] + counts["always_right"] == 6 and len(sampled) == counts["kept"] > 0
    for p in sampled:
        original = next(q for q in pairs if q.prompt == p.prompt and q.chosen == p.chosen)
        assert p.rejected.strip() and p.rejected != p.chosen and p.kind == original.kind + "/sampled"


# ---- DPO runs ------------------------------------------------------------------------------------------

def run_dpo(root, out, *flags):
    args = ["--base", str(root / "sft" / "ckpt_best"), "--data", str(root / "train.jsonl"), "--val_data", str(root / "val.jsonl"),
            "--out_dir", str(root / out), "--batch_size", "4", "--warmup_steps", "1", "--eval_interval", "4",
            "--log_interval", "100", "--eval_prompts", "4", "--answer_tokens", "8", "--device", "cpu", *flags]
    return dpo.main(args)


MODES = {"full": ["--lr", "3e-4"], "lora": ["--lora", "--lora_rank", "4", "--lr", "3e-3"]}


@pytest.fixture(scope="module")
def unbroken(root):
    """8 steps of full DPO and of LoRA DPO, never stopped: {mode: summary}."""
    return {mode: run_dpo(root, f"{mode}_8", *flags, "--max_steps", "8") for mode, flags in MODES.items()}


def records(out_dir: Path) -> list:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_starts_at_ln2_learns_the_pairs_and_writes_08s_checkpoint_format(root, unbroken):
    for mode in MODES:
        log = records(root / f"{mode}_8")
        assert log[0]["step"] == 0 and log[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert log[0]["val_rewards/chosen"] == 0 and log[0]["val_rewards/margins"] == 0  # policy == reference, exactly
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(log[1])
        after = unbroken[mode]["after"]
        assert after["rewards/margins"] > 0 and after["rewards/accuracies"] > 0.5 and after["kl"] > 0, (mode, after)
        model = weights.load_model(root / f"{mode}_8" / "ckpt_best")  # what 08's chat and 09's eval load
        assert isinstance(model, lillm.LilLM) and not lora.lora_modules(model)
    assert sorted(p.name for p in (root / "lora_8" / "ckpt_best").iterdir()) == ["adapter.safetensors", "train_state.pt"]
    meta = weights.read_safetensors(root / "lora_8" / "ckpt_best" / weights.ADAPTER_FILE, "lillm_lora", tensors=False)[0]
    assert meta["base"] == str(root / "sft" / "ckpt_best")


@pytest.mark.parametrize("mode", MODES)
def test_a_stopped_and_resumed_run_equals_an_unbroken_one(root, unbroken, mode):
    run_dpo(root, f"{mode}_stopped", *MODES[mode], "--max_steps", "8", "--stop_at", "3")
    resumed = dpo.main(["--resume", "--out_dir", str(root / f"{mode}_stopped")])
    keys = ("loss", "rewards/margins", "val_loss", "val_rewards/accuracies")
    logs = [[{k: r.get(k) for k in keys} for r in records(root / d)] for d in (f"{mode}_8", f"{mode}_stopped")]
    assert logs[0] == logs[1]  # float32 on CPU, one process: the same numbers, stopped or not
    assert resumed["after"] == unbroken[mode]["after"]


def test_lora_adapters_are_a_base_loaded_merged(root, unbroken):
    """DPO from LoRA adapters (here the LoRA run's own, on the SFT model): the reference is the merged model as
    loaded (step 0 at ln 2 exactly), and the new run's checkpoint loads through both sets of adapters."""
    base = root / "lora_8" / "ckpt_best"
    run_dpo(root, "from_lora", "--base", str(base), "--tokenizer", str(root / "tokenizer.json"), "--max_steps", "2",
            "--eval_interval", "2", "--lr", "3e-4")
    assert records(root / "from_lora")[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    merged, trained = weights.load_model(base), weights.load_model(root / "from_lora" / "ckpt_best")
    assert any(not torch.equal(v, merged.state_dict()[k]) for k, v in trained.state_dict().items())


@pytest.mark.slow
def test_two_processes_equal_one(root):
    """torchrun with 2 ranks x 1 micro-batch takes the same steps as 1 process with 2 (Gloo, CPU)."""
    flags = ["--base", str(root / "sft" / "ckpt_best"), "--data", str(root / "train.jsonl"), "--val_data", str(root / "val.jsonl"),
             "--batch_size", "4", "--max_steps", "3", "--warmup_steps", "1", "--eval_interval", "3", "--eval_prompts", "1",
             "--answer_tokens", "4", "--lr", "1e-3", "--device", "cpu"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "10_dpo/dpo.py",
                          *flags, "--grad_accum", "1", "--out_dir", str(root / "ddp")],
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    dpo.main([*flags, "--grad_accum", "2", "--out_dir", str(root / "single")])
    ddp, single = (load_file(str(root / d / "ckpt_latest" / "model.safetensors")) for d in ("ddp", "single"))
    for k in single:
        assert_close(ddp[k], single[k], atol=1e-5, rtol=1e-4)
    for a, b in zip(records(root / "ddp"), records(root / "single")):
        assert a.get("val_loss") == pytest.approx(b.get("val_loss"), abs=1e-6) and a.get("loss") == pytest.approx(b.get("loss"), abs=1e-5)


def test_bad_pairs_are_a_one_line_error_from_the_command(root, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    for line, problem in ((json.dumps({"prompt": "q", "chosen": "", "rejected": "b"}), "an empty chosen answer"),
                          (json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}), "the chosen answer equals the rejected one")):
        bad.write_text(good + "\n" + line + "\n")
        with pytest.raises(SystemExit) as e:
            dpo.main(["--base", str(root / "sft" / "ckpt_best"), "--out_dir", str(tmp_path / "out"), "--data", str(bad)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {bad}:2: {problem}") and err.count("\n") == 1, err


def test_a_reference_with_another_tokenizer_is_a_one_line_error(root, tmp_path, capsys):
    other = tmp_path / "other.json"
    tokenizer_lib.save_tokenizer(tokenizer_lib.train_tokenizer([scene(20, 99)], vocab_size=280), other)
    with pytest.raises(SystemExit) as e:
        run_dpo(root, tmp_path / "out", "--tokenizer", str(other), "--max_steps", "2")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {other} is not the tokenizer") and err.count("\n") == 1, err


def test_unreachable_hub_is_a_one_line_error_from_the_command(root, tmp_path):
    run = subprocess.run([sys.executable, "10_dpo/dpo.py", "--base", str(root / "sft" / "ckpt_best"), "--out_dir", str(tmp_path / "out"),
                          "--hf_dataset", "no_such_user/no_such_pairs"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("error: could not read 'no_such_user/no_such_pairs'"), run.stderr
    assert run.stderr.count("\n") == 1
