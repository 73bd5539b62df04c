"""Lesson 07 at full scale, on CPU: what a multi-GPU, multi-node run needs, rehearsed with Gloo on this machine.

What is proved: --dry_run runs the full preset's code path (bf16 autocast, torch.compile, fused AdamW, the
global-batch arithmetic) in a minute on a CPU; the full preset refuses a CPU unless asked; a data build
longer than the collectives' timeout cannot kill the run (it happens before the process group exists);
two torchrun "nodes" with their own directories (no shared filesystem) train, stop, and resume from the
one node that holds the checkpoint, to the weights of one process; a second SIGTERM does not kill a run
before its checkpoint is written.

Run: python -m pytest tests/test_07_full_scale.py
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import import_module

import pytest
import torch
from conftest import assert_close
from test_07_pretrain_ddp import ROOT, STEPS, T, args, metrics, weights, write_token_files

train = import_module("07_pretrain_ddp.train")
checkpoint = import_module("07_pretrain_ddp.checkpoint")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    return write_token_files(tmp_path_factory.mktemp("tokens"))


def launch(*argv, launcher=("--standalone", "--nproc_per_node=2"), script=None) -> subprocess.Popen:
    """torchrun (or, with launcher None, plain python) on train.py or another script, output captured."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    start = [sys.executable] if launcher is None else [sys.executable, "-m", "torch.distributed.run", *launcher]
    return subprocess.Popen([*start, str(script or ROOT / "07_pretrain_ddp" / "train.py"), *map(str, argv)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dry_run_checks_the_full_preset_on_a_cpu(token_dir, tmp_path):
    out = tmp_path / "out"
    train.main(["--preset", "full", "--dry_run", "--data_dir", str(token_dir), "--tokenizer", str(token_dir / "tokenizer.json"),
                "--out_dir", str(out)])
    saved = json.loads((out / "dry_run" / "config.json").read_text())
    assert (saved["preset"], saved["dtype"], saved["compile"], saved["grad_accum"]) == ("full", "bfloat16", True, 2)
    assert saved["global_batch_tokens"] == saved["batch_size"] * saved["max_seq_len"] * 2
    records = metrics(out / "dry_run")
    assert [r["step"] for r in records] == [0, 1, 2, 3] and all(r.get("loss", 1) < 10 for r in records)
    assert checkpoint.load_state(out / "dry_run" / "ckpt_latest")["step"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_the_full_preset_refuses_a_cpu_unless_asked(token_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(["--preset", "full", "--data_dir", str(token_dir), "--out_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "--device cpu" in err and "--dry_run" in err, err
    assert not any(tmp_path.iterdir())


SLOW_BUILD = """
import shutil, sys, time
from importlib import import_module
from pathlib import Path
sys.path.insert(0, {root!r})
data, train = import_module("07_pretrain_ddp.data"), import_module("07_pretrain_ddp.train")

def slow_build(cfg):  # a data build that outlasts --dist_timeout, as OpenWebText's takes hours
    if not (Path(cfg["data_dir"]) / "meta.json").exists():
        time.sleep({seconds})
        shutil.copytree({source!r}, cfg["data_dir"], dirs_exist_ok=True)

data.build_token_files = slow_build
train.main(sys.argv[1:])
"""


def test_a_data_build_longer_than_the_collective_timeout_cannot_kill_the_run(token_dir, tmp_path):
    """The build (15 s) outlasts --dist_timeout (0.1 min = 6 s): it happens under a file lock, before the process
    group exists, so no rank waits at a collective meanwhile. (Behind a barrier, the waiting rank timed out.)"""
    script = tmp_path / "slow_build.py"
    script.write_text(SLOW_BUILD.format(root=str(ROOT), seconds=15, source=str(token_dir)))
    run = launch(*args(tmp_path / "data", tmp_path / "out", "--batch_size", 2, "--grad_accum", 1, "--max_steps", 4,
                       "--eval_interval", 2, "--dist_timeout", 0.1), script=script)
    log = run.communicate(timeout=180)[0]
    assert run.returncode == 0, log[-3000:]
    assert [r["step"] for r in metrics(tmp_path / "out")] == [0, 1, 2, 3, 4]


def test_two_nodes_with_their_own_disks_train_stop_and_resume(token_dir, tmp_path, tmp_path_factory):
    """Two torchrun 'nodes' (c10d rendezvous on 127.0.0.1, 1 process each), each with its own --data_dir and
    --out_dir: only global rank 0's node writes checkpoints, the other node never sees one, and the resume
    takes the state and weights from whichever node holds it. The result equals one process's run."""
    nodes = [tmp_path / f"node{i}" for i in range(2)]
    for node in nodes:
        shutil.copytree(token_dir, node / "data")

    def two_nodes(*extra, rdzv_id):
        port = free_port()
        launcher = ("--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={rdzv_id}")
        runs = [launch(*args(node / "data", node / "out", "--batch_size", 4, "--global_batch_tokens", 8 * T, "--max_steps", STEPS,
                             "--eval_interval", 10), *extra, launcher=launcher) for node in nodes]
        logs = [r.communicate(timeout=240)[0] for r in runs]
        assert all(r.returncode == 0 for r in runs), "\n".join(log[-2000:] for log in logs)
        return [node / "out" for node in nodes if checkpoint.find(node / "out" / "ckpt_latest")]

    holders = two_nodes("--stop_at", 20, rdzv_id="first")
    assert len(holders) == 1, "only global rank 0's node writes checkpoints"
    assert checkpoint.load_state(holders[0] / "ckpt_latest")["step"] == 20
    holders = two_nodes("--resume", rdzv_id="second")  # rank 0 may now be the node without the checkpoint
    newest = max(holders, key=lambda out: checkpoint.load_state(out / "ckpt_latest")["step"])
    assert checkpoint.load_state(newest / "ckpt_latest")["step"] == STEPS
    reference = tmp_path_factory.mktemp("one_process")
    train.main(args(token_dir, reference, "--batch_size", 4, "--grad_accum", 2, "--max_steps", STEPS, "--eval_interval", 10))
    got, expected = weights(newest), weights(reference)
    for k in expected:
        assert_close(got[k], expected[k], rtol=1e-4, atol=1e-5)


def test_a_second_sigterm_does_not_kill_the_run_before_its_checkpoint(token_dir, tmp_path):
    """Slurm and torchrun both forward SIGTERM: two arrive. The run must still save and exit 0."""
    out = tmp_path / "out"
    run = launch(*args(token_dir, out, "--batch_size", 4, "--max_steps", 5000, "--eval_interval", 5000, "--log_interval", 20),
                 launcher=None)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 3):
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    log = run.communicate(timeout=120)[0]
    assert run.returncode == 0 and "stopped by a stop signal (SIGTERM" in log, log[-3000:]
    last = metrics(out)[-1]["step"]
    assert 20 <= last < 5000 and checkpoint.load_state(out / "ckpt_latest")["step"] == last


def test_dry_run_of_the_full_preset_with_adamw(token_dir, tmp_path):  # the default, Muon: the dry run above
    out = tmp_path / "out"
    train.main(["--preset", "full", "--dry_run", "--optimizer", "adamw", "--data_dir", str(token_dir),
                "--tokenizer", str(token_dir / "tokenizer.json"), "--out_dir", str(out)])
    assert json.loads((out / "dry_run" / "config.json").read_text())["optimizer"] == "adamw"
    assert [r["step"] for r in metrics(out / "dry_run")] == [0, 1, 2, 3]
