"""Lesson 11: advantages, the clipped loss and k3 against TRL, the reward, the task, pass@k, GRPO runs, resume, DDP.

Run: python -m pytest tests/test_11_grpo.py -q
"""

import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import unicodedata
from collections import defaultdict
from importlib import import_module
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st

lillm = import_module("06_model.model")
weights = import_module("06_model.weights")
tokenizer_lib = import_module("01_tokenizer.tokenizer")
train = import_module("07_pretrain_ddp.train")
data = import_module("07_pretrain_ddp.data")
stage = import_module("07_pretrain_ddp.stage")
template = import_module("08_sft.template")
sft = import_module("08_sft.sft")
sft_data = import_module("08_sft.data")
task = import_module("11_grpo.data")
evaluation = import_module("11_grpo.eval")
grpo = import_module("11_grpo.grpo")

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["HAMLET.", "HORATIO.", "OPHELIA.", "KING CLAUDIUS.", "LAERTES.", "Ber."]
WORDS = "the king ghost night watch castle sword crown poison grave friend mother sleep dream death love".split()
IGNORE = train.IGNORE

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def plays(n_plays: int = 2, n_scenes: int = 8, seed: int = 0) -> list:
    """Documents in the default corpus's layout: per play a cast list, then scenes of labelled speeches."""
    rng, docs = random.Random(seed), []
    for p in range(n_plays):
        docs.append(f"THE TRAGEDY OF PLAY {p}\n\nPersons represented:\n\n" + "\n".join(NAMES))
        for s in range(n_scenes):
            blocks = [f"SCENE {'I' * (s % 3 + 1)}. A room, {p}-{s}.", "[Enter HAMLET.]"]
            for _ in range(rng.randint(6, 10)):
                lines = [" ".join(rng.choices(WORDS, k=rng.randint(3, 6))).capitalize() + "," for _ in range(rng.randint(1, 3))]
                blocks.append("\n".join([rng.choice(NAMES), *lines]))
            docs.append("\n\n".join(blocks) + "\n\n[Exeunt.]")
    return docs


def tiny_config(**overrides):
    base = dict(vocab_size=400, d_model=32, n_layers=2, max_seq_len=64, q_heads=4, kv_heads=2, multiple_of=32)
    return lillm.ModelConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    """A lesson-01 tokenizer (byte-level BPE, its special tokens) trained in-process on a few KB."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    text = plays() + ["Who says this? Name a word.\n" + " ".join(WORDS)]
    tokenizer_lib.save_tokenizer(tokenizer_lib.train_tokenizer(text, vocab_size=400), path)
    return path


@pytest.fixture(scope="module")
def fmt(tok_path):
    return template.ChatFormat(tokenizer_lib.load_tokenizer(tok_path))


# ---- advantages, the clipped surrogate, k3 ---------------------------------------------------------------

groups = st.integers(1, 4).flatmap(lambda n: st.integers(2, 16).flatmap(
    lambda g: st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=g, max_size=g), min_size=n, max_size=n)))


@given(rewards=groups, scale=st.floats(0.5, 4.0), shift=st.floats(-3.0, 3.0))
def test_advantages_have_zero_mean_per_group_and_ignore_the_rewards_scale(rewards, scale, shift):
    r = torch.tensor(rewards, dtype=torch.float64)  # (groups, G)
    a = grpo.group_advantages(r)
    assert_close(a.mean(dim=1), torch.zeros(len(rewards), dtype=torch.float64), atol=1e-12, rtol=0)
    assert_close(grpo.group_advantages(scale * r + shift, eps=0.0)[r.std(1) > 0], grpo.group_advantages(r, eps=0.0)[r.std(1) > 0])
    # with eps 1e-4 only approximately: |dA| / |A| <= eps |c - 1| / (c std), and std >= 0.25 for 0/1 rewards in groups <= 16
    assert_close(grpo.group_advantages(scale * r + shift), a, atol=1e-12, rtol=1e-2)
    same = (r == r[:, :1]).all(dim=1)
    assert (a[same] == 0).all()  # a group with one reward for all carries no signal


def fake_policy(B: int, T: int, V: int = 11, seed: int = 0):
    """A 'model' whose logits are one leaf tensor: the loss's gradient per position and token is its .grad."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    return logits, (lambda inputs: (logits, None))


def fake_batch(B: int, T: int, V: int = 11, seed: int = 0, advantages=None, ragged: bool = True):
    """(inputs, targets, advantages, old, ref): each row a prompt, then a completion of its own length, then padding."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (B, T), generator=g)
    for b in range(B):
        start = 1 + b % 3 if ragged else 2
        end = T - b % 2 if ragged else T
        targets[b, :start], targets[b, end:] = IGNORE, IGNORE  # prompt and padding are not trained
    adv = torch.randn(B, generator=g, dtype=torch.float64) if advantages is None else advantages
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    return torch.zeros(B, T, dtype=torch.long), targets, adv, None, ref


@pytest.mark.parametrize("norm", ["token", "sequence"])
def test_at_the_first_step_on_a_rollout_the_loss_is_the_plain_policy_gradient(norm):
    """rho = 1 when pi_old is the policy itself: the clipped loss's gradient is that of -A log pi, per token
    (token norm: divided by all tokens; sequence norm: by each completion's tokens, then the completions)."""
    logits, model = fake_policy(4, 7)
    batch = fake_batch(4, 7)
    objective = grpo.ClippedObjective(eps=0.2, beta=0.0, norm=norm, temperature=1.0)
    loss, figures = objective.loss_sum(model, batch)
    (grad,) = torch.autograd.grad(loss / objective.count(batch), logits)
    logp = sft.target_logps(model, batch[0], batch[1], 1.0)
    mask = (batch[1] != IGNORE).double()
    per_row = mask.sum(1, keepdim=True) if norm == "sequence" else 1.0
    plain = -(batch[2][:, None] * logp * mask / per_row).sum() / objective.count(batch)
    (expected,) = torch.autograd.grad(plain, logits)
    assert_close(grad, expected)
    assert figures["clip_frac"] == 0 and abs(figures["kl"]) > 0  # nothing clipped at rho = 1; the policy is not the ref


@pytest.mark.parametrize("ratio, advantage, cut", [(1.5, 1.0, True), (0.5, -1.0, True), (1.5, -1.0, False), (0.5, 1.0, False),
                                                   (1.1, 1.0, False), (0.9, -1.0, False)])
def test_the_clip_stops_a_tokens_gradient_only_on_the_side_of_its_advantage(ratio, advantage, cut):
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    old = logp.detach() - torch.log(torch.tensor([[ratio, 1.0]], dtype=torch.float64))  # token 0 at the ratio, token 1 at 1
    loss, clipped = grpo.clipped_surrogate(logp, old, torch.tensor([[advantage]], dtype=torch.float64), 0.2)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert clipped.tolist() == [[cut, False]]
    assert (grad[0, 0] == 0) == cut and grad[0, 1] == pytest.approx(-advantage)  # d(-rho A)/dlogp = -rho A at rho 1
    if not cut:
        assert grad[0, 0] == pytest.approx(-ratio * advantage)


def test_equal_rewards_give_zero_gradient_without_a_kl_term():
    logits, model = fake_policy(4, 7)
    advantages = grpo.group_advantages(torch.ones(1, 4, dtype=torch.float64)).flatten()
    batch = fake_batch(4, 7, advantages=advantages)
    for beta, zero in ((0.0, True), (0.1, False)):
        loss, _ = grpo.ClippedObjective(0.2, beta, "token", 1.0).loss_sum(model, batch)
        (grad,) = torch.autograd.grad(loss, logits)
        assert (grad == 0).all() == zero  # with beta > 0 the KL still pulls toward the reference


def test_only_completion_tokens_carry_gradient():
    logits, model = fake_policy(4, 7)
    batch = fake_batch(4, 7)
    loss, _ = grpo.ClippedObjective(0.2, 0.1, "token", 1.0).loss_sum(model, batch)
    (grad,) = torch.autograd.grad(loss, logits)
    trained = batch[1] != IGNORE  # (B, T)
    assert (grad[~trained] == 0).all() and (grad[trained].abs().sum(-1) > 0).all()


@given(logp=st.lists(st.floats(-12, 0), min_size=1, max_size=20), shift=st.floats(-5, 5))
def test_k3_is_zero_at_the_reference_and_never_negative(logp, shift):
    logp = torch.tensor(logp, dtype=torch.float64)
    assert (grpo.k3(logp, logp) == 0).all()
    assert (grpo.k3(logp, logp + shift) >= 0).all()
    assert_close(grpo.k3(logp, logp + shift), torch.full_like(logp, np.expm1(shift) - shift))


def test_k3_is_never_negative_in_float32_for_tiny_differences():
    """exp(d) - d - 1 in float32 gave about 2% of these draws below 0 (down to -6e-8)."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(1_000_000, generator=g) * 10  # float32, as the policy's log-probs are
    ref = logp + (torch.rand(1_000_000, generator=g) - 0.5) * 4e-4  # d near +-1e-4
    kl = grpo.k3(logp, ref)
    assert kl.dtype == torch.float32 and (kl >= 0).all()
    naive = torch.exp(ref - logp) - (ref - logp) - 1
    assert (naive < 0).float().mean() > 0.001, "the float32 trap this guards against should show on these draws"


def trl_loss(loss_type: str, beta: float, logp, old, ref, advantages, mask):
    """TRL's own GRPOTrainer._compute_loss on given per-token log-probs (its model call replaced by them)."""
    GRPOTrainer = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer
    accelerator = SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  reduce=lambda x, reduction: x)
    trainer = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), loss_type=loss_type,
        epsilon_low=0.2, epsilon_high=0.2, use_vllm=False, model=SimpleNamespace(training=True), accelerator=accelerator,
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp, torch.zeros_like(logp), None))
    B, T = logp.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1), "completion_ids": torch.zeros(B, T, dtype=torch.long),
              "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(trainer, None, inputs), trainer._metrics["train"]


@pytest.mark.parametrize("norm, loss_type", [("token", "dapo"), ("sequence", "grpo")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_equal_trls_grpo_trainer(norm, loss_type, beta):
    """Our objective, divided by its count as lesson 07's step does, against TRL's: off-policy ratios (some clipped)."""
    logits, model = fake_policy(5, 8)
    inputs, targets, advantages, _, ref = fake_batch(5, 8, seed=1)
    mask = (targets != IGNORE).double()
    logp = sft.target_logps(model, inputs, targets, 1.0)
    old = logp.detach() + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    objective = grpo.ClippedObjective(0.2, beta, norm, 1.0)
    batch = (inputs, targets, advantages, old, ref)
    loss, figures = objective.loss_sum(model, batch)
    ours = loss / objective.count(batch)
    theirs, logged = trl_loss(loss_type, beta, logp, old, ref, advantages, mask)
    assert_close(ours, theirs.to(ours.dtype))
    assert_close(torch.autograd.grad(ours, logits, retain_graph=True)[0], torch.autograd.grad(theirs, logits)[0])
    if norm == "token":  # TRL logs token means, as our figures per unit are with --norm token
        assert 0 < figures["clip_frac"] / mask.sum() == pytest.approx(logged["clip_ratio/region_mean"][0])
        if beta:
            assert (figures["kl"] / mask.sum()).item() == pytest.approx(logged["kl"][0])


# ---- the reward and the task -----------------------------------------------------------------------------

@pytest.mark.parametrize("said, answers, expected", [
    ("Hamlet", ["Hamlet"], 1.0), ("hamlet", ["Hamlet"], 1.0), ("HAMLET.", ["Hamlet"], 1.0), ("  Hamlet!\n", ["Hamlet"], 1.0),
    ("King  Claudius", ["King Claudius"], 1.0), ("king-claudius", ["King Claudius"], 1.0), ("Ber", ["Ber."], 1.0),
    ("Hamlet says it", ["Hamlet"], 0.0), ("It is Hamlet.", ["Hamlet"], 0.0), ("Hamlet Horatio", ["Hamlet"], 0.0),
    ("Claudius", ["King Claudius"], 0.0), ("", ["Hamlet"], 0.0), ("...", ["Hamlet"], 0.0), ("Horatio", ["Hamlet", "Horatio"], 1.0),
    ("Hamlet<r1>", ["Hamlet"], 0.0),
    # letters beyond ASCII are letters: an accent is part of the name (not folded), a prefix earns nothing
    ("Zo", ["Zoë"], 0.0), ("Zoé", ["Zoë"], 0.0), ("Jos", ["José"], 0.0), ("geus", ["Ægeus"], 0.0), ("Zoe", ["Zoë"], 0.0),
    ("ZOË!", ["Zoë"], 1.0), ("Zoe\u0308", ["Zoë"], 1.0), ("ÆGEUS", ["Ægeus"], 1.0), ("北京", ["北京"], 1.0), ("北", ["北京"], 0.0),
    ("STRASSE", ["Straße"], 1.0),
])
def test_reward_is_exact_up_to_case_and_punctuation(said, answers, expected):
    assert task.reward(said, answers) == expected


@given(answer=st.text(min_size=1, max_size=12), cut=st.integers(0, 11))
def test_a_strict_prefix_of_an_answer_never_earns_the_reward(answer, cut):
    """Whatever the script: cutting off a letter or digit of the answer costs the reward, and the whole answer earns it."""
    if task.normalize(answer):
        assert task.reward(answer, [answer]) == 1.0
    dropped = answer[cut:]
    if cut < len(answer) and any(unicodedata.category(c)[0] in "LN" for c in dropped):
        assert task.reward(answer[:cut], [answer]) == 0.0


def test_answer_text_drops_the_closing_turn_token_only(fmt):
    ids = fmt.tokenizer.encode("Hamlet", add_special_tokens=False).ids
    assert evaluation.answer_text(fmt, ids + [fmt.eot_id]) == evaluation.answer_text(fmt, ids) == "Hamlet"
    opened = evaluation.answer_text(fmt, ids + [fmt.role_id["user"]])
    assert opened == "Hamlet<r1>" and task.reward(opened, ["Hamlet"]) == 0.0  # not a clean answer


def test_the_task_has_both_forms_of_the_same_items_split_by_scene(tmp_path):
    docs = plays(n_plays=2, n_scenes=10)
    counts = task.build(tmp_path, docs=docs, val_fraction=0.4)
    assert counts["train"] > 20 and counts["val"] > 5
    for split in ("train", "val"):
        opened, choice = (task.read_prompts(tmp_path / form / f"{split}.jsonl") for form in ("open", "choice"))
        assert len(opened) == len(choice) == counts[split]
        for o, c in zip(opened, choice):
            assert o["answers"] == c["answers"] and len(o["answers"]) == 1
            names = c["messages"][0]["content"].split("\n")[0].removeprefix("Who says this? ").rstrip("?").replace(" or ", ", ").split(", ")
            assert len(set(names)) == 4 and o["answers"][0] in names  # four characters, one right
            assert o["messages"][0]["content"] == "Who says this?\n" + c["messages"][0]["content"].split("\n", 1)[1]
    assert task.write_sft(tmp_path / "sft.jsonl", tmp_path / "choice" / "train.jsonl", 10) == 10  # lesson 08's format
    convs = sft_data.read_jsonl(tmp_path / "sft.jsonl")
    train_items = task.read_prompts(tmp_path / "choice" / "train.jsonl")
    assert all({"messages": m[:1], "answers": [m[1]["content"]]} in train_items for m in convs)
    val_lines = {item["messages"][0]["content"].split("\n", 1)[1] for item in task.read_prompts(tmp_path / "open" / "val.jsonl")}
    val_scenes = [d for d in docs if d.startswith("SCENE") and import_module("01_tokenizer.prepare").is_val(d, 0.4)]
    assert all(any(line in scene for scene in val_scenes) for line in val_lines)  # held-out scenes only


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "hi", "answer": "x"', "not valid JSON"),
    ('{"answer": "x"}', 'exactly one of "prompt" and "messages"'),
    ('{"prompt": "hi", "messages": [], "answer": "x"}', 'exactly one of "prompt" and "messages"'),
    ('{"prompt": "hi"}', '"answer" must be'),
    ('{"prompt": "hi", "answer": "?!"}', '"answer" must be'),
    ('{"prompt": "hi", "answer": [3]}', '"answer" must be'),
    ('{"prompt": "hi", "answer": ["Ber", "--"]}', '"answer" must be'),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "answer": "b"}', "the model answers a user"),
    ('{"messages": [{"role": "robot", "content": "a"}], "answer": "b"}', "unknown role 'robot'"),
    ('{"prompt": "hi</s><r2>", "answer": "x"}', "forge"),
])
def test_bad_prompt_files_are_one_line_errors_naming_file_and_line(tmp_path, line, problem):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Who says this?\\nHo!", "answer": ["Bernardo", "Ber"]}\n\n' + line + "\n")
    with pytest.raises(task.DataError, match=problem) as e:
        task.read_prompts(path)
    assert str(e.value).startswith(f"{path}:3") and "\n" not in str(e.value)


# ---- pass@k and sampling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, c, k", [(n, c, k) for n in (1, 4, 6) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_is_the_chance_that_k_of_the_n_samples_hold_a_correct_one(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_a_prompts_samples_do_not_depend_on_how_the_chunks_are_shared(fmt):
    torch.manual_seed(0)
    model = lillm.LilLM(tiny_config(max_batch_size=8))
    prompts = [fmt.encode([{"role": "user", "content": f"Who says this? {w}"}], add_generation_prompt=True)[0] for w in WORDS[:7]]
    args = (prompts, 4, 5, 1.0, 0, fmt.eot_id, 7, 1)  # n 4, 5 new tokens, temperature 1: 2 prompts per chunk
    alone = evaluation.sample(model, *args)
    shared = [evaluation.sample(model, *args, chunks=set(range(r, 4, 2))) for r in range(2)]  # two "ranks"
    assert [a if a is not None else b for a, b in zip(*shared)] == alone
    assert len({tuple(map(tuple, s)) for s in alone}) > 1  # the samples do differ between prompts


# ---- GRPO runs ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grpo_setup(tmp_path_factory, tok_path, fmt):
    """A tiny base, the speaker task built from generated plays, and a 'name a word' task it can learn fast."""
    root = tmp_path_factory.mktemp("grpo")
    shutil.copyfile(tok_path, root / "tokenizer.json")
    torch.manual_seed(0)
    weights.save_model(lillm.LilLM(tiny_config()), root / "base.safetensors")
    task.build(root / "task", docs=plays(n_plays=2, n_scenes=10), val_fraction=0.4)
    # Reward 1 for any of 16 words in a one-token answer: the random base earns it a few times in a hundred.
    rng = random.Random(0)
    for name, n in (("words", 64), ("words_val", 16)):
        rows = [{"prompt": "Name a word.\n" + " ".join(rng.choices(WORDS, k=3)), "answer": WORDS} for _ in range(n)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run_grpo(root, out, *flags):
    args = ["--base", str(root / "base.safetensors"), "--tokenizer", str(root / "tokenizer.json"),
            "--data_dir", str(root / "task"), "--out_dir", str(root / out), "--group_size", "4", "--batch_size", "16", "--grad_accum", "1",
            "--max_new_tokens", "4", "--eval_prompts", "8", "--eval_samples", "4", "--warmup_steps", "1",
            "--log_interval", "1", "--device", "cpu", *flags]
    return grpo.main(args)


def records(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_the_reward_on_a_task_the_base_sometimes_solves(grpo_setup, capsys):
    """'Name a word' in one token, lr 3e-2: the rollouts' mean reward climbs from about a tenth to nearly 1."""
    summary = run_grpo(grpo_setup, "words", "--data", str(grpo_setup / "words.jsonl"), "--val_data", str(grpo_setup / "words_val.jsonl"),
                       "--max_new_tokens", "1", "--max_steps", "20", "--eval_interval", "10", "--lr", "3e-2", "--min_lr", "3e-2", "--group_size", "8",
                       "--batch_size", "32")
    log = records(grpo_setup / "words")
    rewards = [r["reward"] for r in log if "reward" in r]
    assert [r["step"] for r in log] == list(range(21)) and all(0 <= r["zero_signal"] <= 1 for r in log[1:])
    assert np.mean(rewards[:3]) < 0.3 and np.mean(rewards[-3:]) > 0.8, rewards
    assert summary["after"]["pass@1"][0] > summary["before"]["pass@1"][0] + 0.3, summary
    assert (grpo_setup / "words" / "grpo.png").is_file() and (grpo_setup / "words" / "hf" / "config.json").is_file()
    out = capsys.readouterr().out
    assert "zero-signal groups" in out and "paired difference" in out


def test_step_zero_validation_equals_the_eval_command(grpo_setup, fmt):
    run_grpo(grpo_setup, "val0", "--max_steps", "2", "--eval_interval", "2")
    first = records(grpo_setup / "val0")[0]
    model = weights.load_model(grpo_setup / "base.safetensors").eval()
    items = task.spread(task.read_prompts(grpo_setup / "task" / "choice" / "val.jsonl"), 8)
    table = evaluation.score(model, fmt, items, 4, 4, 1.0, 0, 1337)
    figures = evaluation.summarize(table, 4, (1, 4))
    assert first["val_pass@1"] == figures["pass@1"][0] and first["val_greedy"] == figures["greedy"][0]


MODES = {"full": [], "lora_2_iterations": ["--lora", "--lora_rank", "4", "--iterations", "2"]}
EXACT = ("loss", "grad_norm", "reward", "zero_signal", "completion_len", "clip_frac", "kl", "val_loss", "val_pass@1", "val_greedy")


@pytest.mark.parametrize("mode", MODES)
def test_a_stopped_and_resumed_run_equals_an_unbroken_one(grpo_setup, mode):
    """Stopped at step 3 (with --iterations 2: inside a rollout, which the checkpoint then holds) and resumed."""
    words = ["--data", str(grpo_setup / "words.jsonl"), "--val_data", str(grpo_setup / "words_val.jsonl"), "--max_new_tokens", "1"]
    flags = [*MODES[mode], *words, "--max_steps", "6", "--eval_interval", "3", "--beta", "0.1", "--lr", "3e-2"]
    run_grpo(grpo_setup, f"{mode}_6", *flags)
    run_grpo(grpo_setup, f"{mode}_stopped", *flags, "--stop_at", "3")
    grpo.main(["--resume", "--out_dir", str(grpo_setup / f"{mode}_stopped")])
    unbroken, resumed = records(grpo_setup / f"{mode}_6"), records(grpo_setup / f"{mode}_stopped")
    assert [{k: r.get(k) for k in EXACT} for r in resumed] == [{k: r.get(k) for k in EXACT} for r in unbroken]
    assert len({r["reward"] for r in unbroken[1:]}) > 1 and unbroken[-1]["kl"] > 0  # the policy did move


def ddp_step_weights(world: int, rank: int, norm: str, micro: int) -> dict:
    """One optimizer step (SGD, lr 1) of a tiny model on 12 fixed rollout rows of ragged lengths, this rank's
    share of them cut into `micro` micro-batches; its weights after the step."""
    torch.manual_seed(0)
    model = lillm.LilLM(tiny_config(vocab_size=64)).eval()
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(12):
        ids = torch.randint(3, 64, (6 + i % 5,), generator=g).tolist()
        rows.append((ids, [False] * 3 + [True] * (len(ids) - 3)))
    advantages = torch.randn(12, generator=g)
    share = list(range(rank * 12 // world, (rank + 1) * 12 // world))  # ranks hold unequal token counts
    cuts = np.array_split(np.array(share), micro)
    batches = []
    for cut in cuts:
        inputs, targets = sft.collate([rows[i] for i in cut], pad_id=2)
        with torch.no_grad():
            ref = sft.target_logps(model, inputs, targets, 1.0) - 0.1
        batches.append((inputs, targets, advantages[cut], None, ref))
    run = stage.Run(world > 1, rank, rank, world, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    objective = grpo.ClippedObjective(0.2, 0.1, norm, 1.0)
    train.train_step(model, train.wrap_ddp(model, run), optimizer, batches, run, 0.0, torch.autocast("cpu", enabled=False), objective)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("norm", ["token", "sequence"])
def test_the_step_does_not_depend_on_how_the_batch_is_cut_into_micro_batches(norm):
    one, four = ddp_step_weights(1, 0, norm, 1), ddp_step_weights(1, 0, norm, 4)
    for k in one:
        assert_close(four[k], one[k], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_two_processes_take_the_step_of_one(tmp_path):
    """torchrun, 2 ranks (Gloo), each with its own share of the rows in 2 micro-batches == 1 process with all of them."""
    script = tmp_path / "ddp_step.py"
    script.write_text(
        f"import os, sys, torch\nsys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\nimport test_11_grpo as t\n"
        "stage = t.stage\nwith stage.distributed('cpu') as run:\n"
        "    for norm in ('token', 'sequence'):\n"
        "        w = t.ddp_step_weights(run.world, run.rank, norm, 2)\n"
        f"        if run.master: torch.save(w, {str(tmp_path)!r} + f'/{{norm}}.pt')\n")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                         cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for norm in ("token", "sequence"):
        ddp, single = torch.load(tmp_path / f"{norm}.pt"), ddp_step_weights(1, 0, norm, 3)
        for k in single:
            assert_close(ddp[k], single[k], atol=1e-6, rtol=1e-5)


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, problem", [
    (["--group_size", "3"], "a divisor of batch_size x grad_accum = 16"),
    (["--group_size", "1", "--batch_size", "4"], "need at least 2"),
    (["--clip_eps", "1.5"], "0 < clip_eps < 1"),
    (["--data", "x.jsonl"], "give --data and --val_data together"),
    (["--iterations", "0"], "--iterations 0: must be at least 1"),
    (["--base", "no/such/ckpt"], "no checkpoint"),
])
def test_bad_input_is_a_one_line_error_from_the_command(grpo_setup, tmp_path, capsys, flags, problem):
    with pytest.raises(SystemExit) as e:
        run_grpo(grpo_setup, tmp_path / "out", *flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and problem in err and err.count("\n") == 1, err


def test_a_bad_prompt_file_from_the_command_names_its_line(grpo_setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Name a word.", "answer": "king"}\n{"prompt": "x"}\n')
    run = subprocess.run([sys.executable, "11_grpo/grpo.py", "--base", str(grpo_setup / "base.safetensors"), "--tokenizer", str(grpo_setup / "tokenizer.json"),
                          "--out_dir", str(tmp_path / "out"), "--data", str(bad), "--val_data", str(bad)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith(f"error: {bad}:2: \"answer\" must be"), run.stderr
    assert run.stderr.count("\n") == 1
