"""Lesson 07: the DDP pretraining script, on CPU with Gloo and a tiny model.

What is proved: 2 torchrun processes == 1 process at the same global batch; a run stopped and resumed
== a run that never stopped (exactly in one process, within float32 tolerance under DDP); SIGTERM to
one rank stops every rank at the same step with a loadable checkpoint; a kill while a checkpoint is
written leaves the previous one loadable; the sampler reads every window once per epoch, disjoint
across ranks, reproducibly; the schedule reaches min_lr exactly at max_steps; a short run lowers the
validation loss; bad input is a one-line error that overwrites nothing.

The token files are written here: a 64-token Markov chain (two likely successors per token), which a
tiny model learns in a few steps. Single-process runs call the trainer in-process (no torch import
per run); the DDP runs go through torchrun.

Run: python -m pytest tests/test_07_pretrain_ddp.py
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import import_module
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

ROOT = Path(__file__).resolve().parents[1]
train = import_module("07_pretrain_ddp.train")
data = import_module("07_pretrain_ddp.data")
stage = import_module("07_pretrain_ddp.stage")
checkpoint = import_module("07_pretrain_ddp.checkpoint")
tokenizer_lib = import_module("01_tokenizer.tokenizer")

VOCAB, T = 64, 32
TINY = ["--preset", "cpu", "--d_model", "32", "--n_layers", "2", "--q_heads", "4", "--kv_heads", "2", "--max_seq_len", str(T),
        "--multiple_of", "16", "--lr", "1e-2", "--min_lr", "1e-3", "--warmup_steps", "3", "--eval_tokens", "1024",
        "--log_interval", "1000", "--sample_tokens", "0", "--device", "cpu"]
STEPS = 40  # long enough for SIGTERM to land mid-run, short enough for CI


def write_token_files(d: Path, n_train: int = 24_000, n_val: int = 4_000, seed: int = 0) -> Path:
    """tokenizer.json (a word-level vocabulary w3..w63), train.bin, val.bin and meta.json as lesson 01 writes them."""
    d.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    rng = np.random.default_rng(seed)
    successors = rng.integers(3, VOCAB, size=(VOCAB, 2))

    def chain(n):
        out, t = np.empty(n, dtype=np.uint16), 3
        for i, (u, pick, other) in enumerate(zip(rng.random(n), rng.integers(0, 2, n), rng.integers(3, VOCAB, n))):
            t = 2 if u < 0.02 else int(successors[t, pick]) if u < 0.9 else int(other)  # </s> ends a "document"
            out[i] = t
        return out

    splits = {"train": chain(n_train), "val": chain(n_val)}
    for name, ids in splits.items():
        ids.tofile(d / f"{name}.bin")
    meta = {"vocab_size": VOCAB, "dtype": "uint16", "train_tokens": n_train, "val_tokens": n_val,
            "train_docs": int((splits["train"] == 2).sum()), "val_docs": int((splits["val"] == 2).sum()),
            "tokenizer_sha256": tokenizer_lib.tokenizer_sha256(d / "tokenizer.json"), "corpus": "markov",
            "split_rule": "generated", "eot_id": 2}
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def args(data_dir: Path, out_dir: Path, *extra) -> list[str]:
    paths = ["--data_dir", str(data_dir), "--tokenizer", str(data_dir / "tokenizer.json"), "--out_dir", str(out_dir)]
    return [*TINY, *paths, *map(str, extra)]


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def weights(out_dir: Path, name: str = "ckpt_latest") -> dict:
    return load_file(str(out_dir / name / "model.safetensors"))


def torchrun(*argv, nproc: int = 2) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             str(ROOT / "07_pretrain_ddp" / "train.py"), *argv],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def worker_pid(agent_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (Linux /proc)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            if f"PPid:\t{agent_pid}\n" not in status.read_text():
                continue
            env = dict(kv.split("=", 1) for kv in (status.parent / "environ").read_text().split("\0") if "=" in kv)
        except OSError:  # the process ended meanwhile
            continue
        if env.get("RANK") == str(rank):
            return int(status.parent.name)
    return None


def snapshot(*dirs: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for d in dirs for p in sorted(Path(d).rglob("*")) if p.is_file()}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    return write_token_files(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def reference(token_dir, tmp_path_factory):
    """One process, global batch 8 windows = batch 4 x grad_accum 2, no interruption."""
    out = tmp_path_factory.mktemp("reference")
    train.main(args(token_dir, out, "--batch_size", 4, "--global_batch_tokens", 8 * T, "--max_steps", STEPS, "--eval_interval", 10,
                    "--sample_tokens", 8))
    return out


@pytest.fixture(scope="module")
def ddp_run(token_dir, tmp_path_factory):
    """torchrun, 2 processes x batch 2 x grad_accum 2 = the reference's global batch; SIGTERM to rank 1 mid-run, then --resume."""
    out = tmp_path_factory.mktemp("ddp")
    first = torchrun(*args(token_dir, out, "--batch_size", 2, "--global_batch_tokens", 8 * T, "--max_steps", STEPS, "--eval_interval", 10))
    deadline, pid = time.time() + 120, None
    while time.time() < deadline and first.poll() is None:
        if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 3:  # steps 0..2 done: every handler is installed
            pid = worker_pid(first.pid, rank=1)
            break
        time.sleep(0.05)
    assert pid is not None, "the DDP run ended or hung before step 2"
    os.kill(pid, signal.SIGTERM)
    first_log = first.communicate(timeout=120)[0]
    stopped = {"metrics": metrics(out), "state": checkpoint.load_state(out / "ckpt_latest"),
               "params": checkpoint.load_model(out / "ckpt_latest").num_params()}  # before --resume replaces it
    second = torchrun("--resume", "--out_dir", out)
    second_log = second.communicate(timeout=120)[0]
    return {"out": out, "first": (first.returncode, first_log), "stopped": stopped, "second": (second.returncode, second_log)}


# ---- the sampler and the schedule ------------------------------------------------------------------------------


@given(n=st.integers(1, 50), batch=st.integers(1, 6), world=st.integers(1, 4), seed=st.integers(0, 2**32 - 1), epochs=st.integers(1, 3))
def test_sampler_reads_each_window_once_per_epoch_disjoint_across_ranks(n, batch, world, seed, epochs):
    stream = data.WindowStream(n, seed)
    ranks = [data.RankSampler(stream, batch, r, world) for r in range(world)]
    micro_batches = [[s.next_ids() for s in ranks] for _ in range(-(-epochs * n // (batch * world)))]
    read = np.concatenate([ids for mb in micro_batches for ids in mb])  # in stream order: rank 0's, rank 1's, ...
    for e in range(epochs):  # the whole stream, each epoch a permutation: no window twice, none skipped
        assert sorted(read[e * n : (e + 1) * n].tolist()) == list(range(n))
    for k, mb in enumerate(micro_batches):  # within a micro-batch, no two ranks read one window of the same epoch
        tagged = [((k * world + r) * batch + i) // n * n + w for r, ids in enumerate(mb) for i, w in enumerate(ids.tolist())]
        assert len(set(tagged)) == len(tagged)  # (epoch, window) pairs, encoded as epoch * n + window
    again = data.RankSampler(data.WindowStream(n, seed), batch, 1 % world, world)
    assert all(np.array_equal(again.next_ids(), mb[1 % world]) for mb in micro_batches), "same seed, same order"
    resumed = data.RankSampler(data.WindowStream(n, seed), batch, 0, world, position=batch * world)
    assert all(np.array_equal(resumed.next_ids(), mb[0]) for mb in micro_batches[1:]), "a saved position continues the stream"
    if n >= 10:
        assert not np.array_equal(data.epoch_order(n, seed, 0), data.epoch_order(n, seed + 1, 0)), "the seed drives the order"
        assert not np.array_equal(data.epoch_order(n, seed, 0), data.epoch_order(n, seed, 1)), "each epoch is reshuffled"


@given(max_lr=st.floats(1e-5, 1.0), ratio=st.floats(0.0, 1.0), warmup=st.integers(0, 50), after=st.integers(1, 200))
def test_schedule_warms_up_then_reaches_min_lr_exactly_at_max_steps(max_lr, ratio, warmup, after):
    min_lr, max_steps = max(max_lr * ratio, 1e-12), warmup + after
    lrs = [train.lr_at(s, max_lr, min_lr, warmup, max_steps) for s in range(max_steps)]
    assert lrs[-1] == pytest.approx(min_lr, rel=1e-12, abs=1e-15), "the last update runs at min_lr"
    if warmup:
        assert lrs[warmup - 1] == pytest.approx(max_lr, rel=1e-12) and lrs[0] == pytest.approx(max_lr / warmup)
        assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(a >= b - 1e-15 for a, b in zip(lrs[warmup:], lrs[warmup + 1 :])), "cosine decay never rises"
    assert all(0 < lr <= max_lr + 1e-15 for lr in lrs) and all(lr >= min_lr - 1e-15 for lr in lrs[warmup:])


def test_weight_decay_on_attention_and_ffn_matrices_only():
    lillm = import_module("06_model.model")
    model = lillm.LilLM(lillm.ModelConfig(vocab_size=64, d_model=32, n_layers=2, q_heads=4, kv_heads=2))
    decay, no_decay = train.make_optimizer(model, 1e-3, 0.1, torch.device("cpu")).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    matrices = sorted(n for n, p in model.named_parameters() if p.dim() == 2 and "tok_embeddings" not in n)
    assert sorted(names[id(p)] for p in decay["params"]) == matrices
    assert {names[id(p)] for p in no_decay["params"]} >= {"tok_embeddings.weight", "norm.weight", "layers.0.attention_norm.weight"}


# ---- one process -------------------------------------------------------------------------------------------------


def test_short_run_lowers_val_loss_and_logs_every_step(reference, capsys):
    records = metrics(reference)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert [r["step"] for r in records] == list(range(STEPS + 1))
    assert all({"loss", "lr", "tokens_per_s"} <= set(r) for r in records[1:])
    assert val[-1] < val[0] - 1.0, f"validation loss went {val[0]:.3f} -> {val[-1]:.3f}"
    assert json.loads((reference / "config.json").read_text())["grad_accum"] == 2
    image = matplotlib.image.imread(reference / "loss.png")[..., :3]  # (H, W, RGB) in [0, 1]
    assert image.shape == (500, 800, 3)
    for color in ("tab:blue", "tab:red"):  # the train curve and the validation curve are drawn
        near = np.abs(image - np.array(matplotlib.colors.to_rgb(color))).sum(-1) < 0.05
        assert near.sum() > 200, f"no {color} curve in loss.png"
    assert checkpoint.load_state(reference / "ckpt_best")["val_loss"] == min(val[1:])


def test_resume_is_exact_in_one_process(token_dir, tmp_path):
    """Stopped at step 7 and resumed == never stopped, bit for bit (dropout on, so every RNG must be restored)."""
    run = lambda out, *extra: train.main(args(token_dir, out, "--batch_size", 4, "--grad_accum", 2, "--max_steps", 16,  # noqa: E731
                                             "--eval_interval", 5, "--dropout", 0.1, *extra))
    run(tmp_path / "whole")
    run(tmp_path / "parts", "--stop_at", 7)
    assert checkpoint.load_state(tmp_path / "parts" / "ckpt_latest")["step"] == 7
    torch.manual_seed(12345)  # the trainer must not depend on whatever RNG state it finds
    train.main(["--resume", "--out_dir", str(tmp_path / "parts")])
    keep = lambda records: [{k: r.get(k) for k in ("step", "loss", "lr", "grad_norm", "val_loss")} for r in records]  # noqa: E731
    assert keep(metrics(tmp_path / "parts")) == keep(metrics(tmp_path / "whole"))
    whole, parts = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


# ---- DDP ---------------------------------------------------------------------------------------------------------


def count_gradient_allreduces(rank: int, world: int, init_file: str, micro_steps: int, results) -> None:
    """One process of a Gloo group: 3 optimizer steps of train_step through DDP with a communication hook
    that records which bucket each gradient all-reduce carries; then the same with no_sync disabled."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lillm = import_module("06_model.model")
    model = lillm.LilLM(lillm.ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, q_heads=4, kv_heads=2, max_seq_len=T))
    run = stage.Run(True, rank, rank, world, torch.device("cpu"))
    ddp = train.wrap_ddp(model, run)
    buckets = []  # bucket indices, in the order their all-reduces were launched
    ddp.register_comm_hook(None, lambda state, bucket: buckets.append(bucket.index()) or allreduce_hook(state, bucket))
    optimizer = train.make_optimizer(model, 1e-3, 0.1, run.device)
    per_step = {}
    for mode in ("no_sync", "without no_sync"):
        if mode == "without no_sync":
            ddp.no_sync = contextlib.nullcontext  # what a trainer that forgets no_sync does
        per_step[mode] = []
        for _ in range(3):
            batches = [(torch.randint(0, VOCAB, (2, T)), torch.randint(0, VOCAB, (2, T))) for _ in range(micro_steps)]
            train.train_step(model, ddp, optimizer, batches, run, 1.0, contextlib.nullcontext())
            per_step[mode].append(sorted(buckets))
            buckets.clear()
    results[rank] = per_step
    torch.distributed.destroy_process_group()


def test_ddp_all_reduces_each_gradient_bucket_once_per_step_with_accumulation(tmp_path):
    """With 3 micro-steps, no_sync must leave exactly one all-reduce per bucket per optimizer step; the
    equality tests alone could not see a missing no_sync (the sum of 3 all-reduced gradients is the same)."""
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(count_gradient_allreduces, args=(2, str(tmp_path / "store"), 3, results), nprocs=2)
    for per_step in results.values():
        n_buckets = len(set(per_step["no_sync"][0]))
        assert n_buckets >= 1
        assert per_step["no_sync"] == [list(range(n_buckets))] * 3, per_step
        assert per_step["without no_sync"] == [sorted(list(range(n_buckets)) * 3)] * 3, "the hook must see every all-reduce"


def test_ddp_two_processes_equal_one_process(ddp_run, reference):
    code, log = ddp_run["first"]
    assert code == 0, log[-4000:]
    ref = {r["step"]: r for r in metrics(reference)}
    stopped = ddp_run["stopped"]["metrics"]
    assert len(stopped) >= 3
    for r in stopped[1:]:
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=1e-5), f"step {r['step']}"
        if "val_loss" in r:
            assert r["val_loss"] == pytest.approx(ref[r["step"]]["val_loss"], rel=1e-5)


def test_sigterm_to_one_rank_stops_all_with_a_loadable_checkpoint(ddp_run):
    code, log = ddp_run["first"]
    last, state = ddp_run["stopped"]["metrics"][-1]["step"], ddp_run["stopped"]["state"]
    assert code == 0 and "stopped by a stop signal (on another rank)" in log, log[-4000:]
    assert 2 <= last < STEPS
    assert state["step"] == last and state["data_position"] == last * 8 and len(state["rng"]) == 2
    assert ddp_run["stopped"]["params"] == checkpoint.load_model(ddp_run["out"] / "ckpt_latest").num_params()


def test_ddp_resume_matches_the_uninterrupted_run(ddp_run, reference):
    code, log = ddp_run["second"]
    assert code == 0, log[-4000:]
    ref, got = metrics(reference), metrics(ddp_run["out"])
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    assert [r["loss"] for r in got[1:]] == pytest.approx([r["loss"] for r in ref[1:]], rel=1e-4)
    ddp_weights, ref_weights = weights(ddp_run["out"]), weights(reference)
    for k in ref_weights:
        assert_close(ddp_weights[k], ref_weights[k], rtol=1e-4, atol=1e-5)


# ---- nothing lost ------------------------------------------------------------------------------------------------

CRASH = """
import os, sys, torch
from importlib import import_module
from pathlib import Path
sys.path.insert(0, {root!r})
checkpoint, lillm = import_module("07_pretrain_ddp.checkpoint"), import_module("06_model.model")
model = lillm.LilLM(lillm.ModelConfig(vocab_size=64, d_model=32, n_layers=1, q_heads=4, kv_heads=2))
where = Path({where!r})
if {point!r} == "write":  # die with train_state.pt half-written
    torch.save = lambda obj, f: (open(f, "wb").write(b"PK half a file"), os._exit(9))
else:  # die between the two renames of the swap
    rename = Path.rename
    Path.rename = lambda self, target: (rename(self, target), os._exit(9) if str(target).endswith(".old") else None)[1]
checkpoint.save(where, model, {{"step": 2}})
"""


@pytest.mark.parametrize("point", ["write", "swap"])
def test_kill_while_saving_leaves_the_previous_checkpoint(tmp_path, point):
    lillm = import_module("06_model.model")
    model = lillm.LilLM(lillm.ModelConfig(vocab_size=64, d_model=32, n_layers=1, q_heads=4, kv_heads=2))
    where = tmp_path / "ckpt_latest"
    state = {"step": 1, "optimizer": {}, "rng": [], "data_position": 0, "config": {}, "tokenizer_sha256": "", "best_val_loss": 1.0}
    checkpoint.save(where, model, state)
    script = CRASH.format(root=str(ROOT), where=str(where), point=point)
    crashed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert crashed.returncode == 9, crashed.stderr
    assert checkpoint.find(where) == (where if point == "write" else tmp_path / "ckpt_latest.old")
    assert checkpoint.load_state(where)["step"] == 1
    assert_close(checkpoint.load_model(where).tok_embeddings.weight, model.tok_embeddings.weight)
    checkpoint.save(where, model, dict(state, step=3))  # the next save recovers and cleans up
    assert checkpoint.load_state(where)["step"] == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_latest"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = snapshot(out / "ckpt_latest", out / "ckpt_best")
    with pytest.raises(SystemExit) as stop:
        train.main(["--resume", "--out_dir", str(out), "--max_steps", str(STEPS + 20), "--lr", "1e30", "--min_lr", "1e30"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and "not finite" in err and err.count("\n") == 1, err
    assert snapshot(out / "ckpt_latest", out / "ckpt_best") == before


# ---- bad input: one line on stderr, exit code 2, nothing overwritten ---------------------------------------------


def break_meta(d: Path, **changes):
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, **changes}))


BAD_INPUT = {
    "missing train.bin": (lambda d, o: (d / "train.bin").unlink(), [], "train.bin should hold"),
    "missing tokenizer": (lambda d, o: (d / "tokenizer.json").unlink(), [], "no tokenizer at"),
    "dtype uint32": (lambda d, o: break_meta(d, dtype="uint32"), [], "dtype uint32"),
    "another tokenizer": (lambda d, o: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text().replace("w63", "w99")), [],
                          "another tokenizer"),
    "vocab of the checkpoint": (lambda d, o: break_meta(d, vocab_size=VOCAB + 8), ["--resume"], "vocab_size"),
    "invalid model config": (lambda d, o: None, ["--kv_heads", "3"], "invalid model config"),
    "warmup past the end": (lambda d, o: None, ["--warmup_steps", "50", "--max_steps", "50"], "warmup_steps"),
    "global batch does not divide": (lambda d, o: None, ["--global_batch_tokens", "1000"], "not a multiple"),
    "corrupt weights": (lambda d, o: (o / "ckpt_latest" / "model.safetensors").write_bytes(b"\0" * 100), ["--resume"], "corrupt"),
    "corrupt train state": (lambda d, o: (o / "ckpt_latest" / "train_state.pt").write_bytes(b"PK\3\4"), ["--resume"], "corrupt"),
    "resume with another shape": (lambda d, o: None, ["--resume", "--d_model", "64"], "different model config"),
    "resume without a checkpoint": (lambda d, o: shutil.rmtree(o), ["--resume"], "no checkpoint"),
    "a checkpoint but no --resume": (lambda d, o: None, [], "already holds a checkpoint"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_a_one_line_error_and_overwrites_nothing(case, token_dir, reference, tmp_path, capsys):
    breaks, extra, message = BAD_INPUT[case]
    d, out = tmp_path / "tokens", tmp_path / "out"
    shutil.copytree(token_dir, d)
    shutil.copytree(reference, out)
    breaks(d, out)
    if "--resume" not in extra and case != "a checkpoint but no --resume":
        shutil.rmtree(out, ignore_errors=True)
    before = snapshot(d, out) if out.exists() else snapshot(d)
    with pytest.raises(SystemExit) as stop:
        train.main(args(d, out, "--batch_size", 4, "--max_steps", 20, *extra))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert (snapshot(d, out) if out.exists() else snapshot(d)) == before


def test_bad_flag_from_the_command_line(tmp_path):
    """The real entry point: the same one-line error and exit code outside pytest."""
    run = subprocess.run([sys.executable, str(ROOT / "07_pretrain_ddp" / "train.py"), "--out_dir", str(tmp_path), "--max_steps", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 2 and run.stderr == "error: --max_steps 0: must be at least 1\n", run.stderr


# ---- Muon ----------------------------------------------------------------------------------------------------

muon = import_module("07_pretrain_ddp.muon")


@given(rows=st.integers(2, 48), cols=st.integers(2, 48), steps=st.integers(1, 6), nesterov=st.booleans(),
       adjust=st.sampled_from(["match_rms_adamw", "original"]), wd=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**16))
def test_muon_equals_torch_optim_muon_step_for_step(rows, cols, steps, nesterov, adjust, wd, seed):
    """The same parameters and gradients, several steps: bit for bit the same weights and momentum (tolerance 0)."""
    g = torch.Generator().manual_seed(seed)
    ours, theirs = torch.nn.Parameter(torch.randn(rows, cols, generator=g)), torch.nn.Parameter(torch.zeros(rows, cols))
    theirs.data.copy_(ours.data)
    a = muon.Muon([ours], lr=0.02, weight_decay=wd, nesterov=nesterov, adjust=adjust, ns_dtype=torch.bfloat16)  # torch's dtype
    b = torch.optim.Muon([theirs], lr=0.02, weight_decay=wd, nesterov=nesterov, adjust_lr_fn=adjust)
    for _ in range(steps):
        grad = torch.randn(rows, cols, generator=g)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    assert torch.equal(ours, theirs)
    assert torch.equal(a.state[ours]["momentum_buffer"], b.state[theirs]["momentum_buffer"])


@given(rows=st.integers(8, 96), cols=st.integers(8, 96), spread=st.floats(1.0, 100.0), seed=st.integers(0, 2**16))
def test_newton_schulz_puts_every_singular_value_within_100x_of_the_top_in_the_band(rows, cols, spread, seed):
    """notes.md's claim: singular values within a factor 100 of the largest end in [0.6, 1.25], the directions kept."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    s = torch.logspace(0, -math.log10(spread), k)  # (k,) from 1 down to 1 / spread
    for dtype in (torch.bfloat16, torch.float32):  # the paper's (a GPU's), and a CPU's
        o = muon.newton_schulz(u @ torch.diag(s) @ v.T, dtype=dtype).float()
        sv = torch.linalg.svdvals(o)
        assert 0.6 <= sv.min() and sv.max() <= 1.25, (dtype, sv.min().item(), sv.max().item())
        assert torch.allclose(u.T @ o @ v, torch.diag(torch.diagonal(u.T @ o @ v)), atol=0.05)  # still diagonal in U, V


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    lillm = import_module("06_model.model")
    model = lillm.LilLM(lillm.ModelConfig(vocab_size=64, d_model=32, n_layers=2, q_heads=4, kv_heads=2))
    opt = train.make_optimizer(model, 1e-3, 0.1, torch.device("cpu"), "muon", muon_lr=0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {name: sorted(names[id(p)] for g in o.param_groups for p in g["params"]) for name, o in opt.optimizers.items()}
    assert got["muon"] == sorted(n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("layers."))
    assert set(got["adamw"]) == {n for n, p in model.named_parameters() if p.dim() == 1} | {"tok_embeddings.weight"}
    assert opt.optimizers["muon"].param_groups[0]["lr_scale"] == 20.0  # its own rate, on the loop's schedule


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_either_optimizer_resumes_exactly_with_its_state_in_the_checkpoint(optimizer, token_dir, tmp_path):
    run = lambda out, *extra: train.main(args(token_dir, out, "--batch_size", 4, "--grad_accum", 2, "--max_steps", 12,  # noqa: E731
                                             "--eval_interval", 4, "--optimizer", optimizer, "--muon_lr", 0.02, *extra))
    run(tmp_path / "whole")
    run(tmp_path / "parts", "--stop_at", 5)
    state = checkpoint.load_state(tmp_path / "parts" / "ckpt_latest")
    saved = state["optimizer"]["muon"]["state"] if optimizer == "muon" else state["optimizer"]["state"]
    assert state["config"]["optimizer"] == optimizer and saved, "the momentum buffers are saved"
    train.main(["--resume", "--out_dir", str(tmp_path / "parts")])
    keep = lambda records: [{k: r.get(k) for k in ("step", "loss", "lr", "grad_norm", "val_loss")} for r in records]  # noqa: E731
    assert keep(metrics(tmp_path / "parts")) == keep(metrics(tmp_path / "whole"))
    whole, parts = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    assert metrics(tmp_path / "whole")[-1]["val_loss"] < metrics(tmp_path / "whole")[0]["val_loss"] - 0.5  # it trains


def test_adamw_under_ddp_equals_one_process(token_dir, tmp_path):  # the default, Muon: the DDP test above
    common = ("--global_batch_tokens", 8 * T, "--max_steps", 6, "--eval_interval", 3, "--optimizer", "adamw")
    train.main(args(token_dir, tmp_path / "one", "--batch_size", 4, *common))
    two = torchrun(*args(token_dir, tmp_path / "two", "--batch_size", 2, *common))
    log = two.communicate(timeout=300)[0]
    assert two.returncode == 0, log[-3000:]
    one, ddp = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["loss"] for r in ddp[1:]] == pytest.approx([r["loss"] for r in one[1:]], rel=1e-4)


@pytest.mark.parametrize("extra, message", [(["--optimizer", "muon", "--muon_lr", "0"], "--muon_lr 0.0: must be positive"),
                                            (["--resume", "--optimizer", "adamw"], "--optimizer adamw (checkpoint: muon)")])
def test_bad_muon_flags_are_one_line_errors(extra, message, token_dir, reference, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    with pytest.raises(SystemExit) as stop:
        train.main(args(token_dir, out, "--batch_size", 4, "--max_steps", 20, *extra))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and message in err, err
