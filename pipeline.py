"""One command for the whole life of the model, through each lesson's own entry point, ending with a report card.

    data      01  tokenizer and token files             OUT/data/
    pretrain  07  the main job                           OUT/pretrain/
    eval      09  the base model: bpb, the benchmark     OUT/pretrain/ckpt_best/eval.json
    sft       08  a chat model, and its eval, chat form  OUT/sft/
    dpo       10  preferences, and its eval              OUT/dpo/
    grpo      11  the choice-form warm-up (two SFT runs), GRPO (torchrun, a process per core on a CPU), pass@1 before/after
    gguf      06  the final chat model as one q8_0 file for llama.cpp and ollama
    serve     12  the server on the final chat model, one streamed answer through the official openai client

    python pipeline.py                      # the cpu preset without a GPU (~25 min on 2 idle cores), full with one
    python pipeline.py --preset full        # the seed's recipe: OpenWebText, the 39.6M model, torchrun on every GPU
    python pipeline.py --stages sft,dpo     # a subset (the stages before must have run: their outputs are the inputs)
    python pipeline.py --out_dir out/run2   # everything under another directory

Rerun the same command after anything: a stage that finished (its outputs present and newer than its inputs) is
skipped; an interrupted training stage continues with its own --resume; a failed stage stops the pipeline with its
one-line error and its log (OUT/logs/STAGE.log), and nothing after it runs. Ctrl-C or SIGTERM reach the running
stage once, which saves and stops. OUT/report.md and OUT/report.json hold every stage's figures, read from the
files the stages write. The shakespeare download cache (data/cache) is shared with the lessons' own commands.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STAGES = ("data", "pretrain", "eval", "sft", "dpo", "grpo", "gguf", "serve")
QUESTION = "Who says this?\nTo be, or not to be, that is the question."


def presets(out: Path, gpus: int) -> dict:
    """Each preset's flags per step. cpu: the README's recipes; full: each lesson's full preset; tiny: every stage
    in seconds (the pipeline's own test)."""
    common = {"data": [], "tokenizer": [], "pretrain": [], "eval": [], "sft": [], "dpo": [], "warm1": ["--max_steps", "300", "--lr", "1e-3"],
              "warm2": ["--max_steps", "300", "--lr", "5e-4", "--seed", "7"], "grpo": [], "grpo_procs": 0, "grpo_eval": ["--prompts", "936"], "warm_sft": "20000"}
    tiny = dict(common, tokenizer=["--vocab_size", "512"], pretrain=[
        "--preset", "cpu", "--d_model", "32", "--n_layers", "1", "--q_heads", "2", "--kv_heads", "1", "--max_seq_len", "64", "--multiple_of", "16",
        "--batch_size", "4", "--max_steps", "100", "--warmup_steps", "5", "--eval_interval", "50", "--eval_tokens", "1024",
        "--log_interval", "1", "--sample_tokens", "8"], eval=["--limit", "20", "--bpb_tokens", "2048"],
        sft=["--warmup_steps", "1", "--max_steps", "4", "--eval_interval", "2", "--eval_prompts", "4", "--answer_tokens", "8", "--batch_size", "4"],
        dpo=["--warmup_steps", "1", "--max_steps", "2", "--eval_interval", "2", "--max_pairs", "64", "--val_pairs", "8", "--eval_prompts", "4",
             "--answer_tokens", "8", "--batch_size", "4"],
        warm1=["--warmup_steps", "1", "--max_steps", "2", "--eval_interval", "2", "--eval_prompts", "2", "--answer_tokens", "4", "--batch_size", "4", "--lr", "1e-3"],
        warm2=["--warmup_steps", "1", "--max_steps", "2", "--eval_interval", "2", "--eval_prompts", "2", "--answer_tokens", "4", "--batch_size", "4", "--seed", "7"],
        grpo=["--warmup_steps", "1", "--max_steps", "2", "--eval_interval", "2", "--eval_prompts", "4", "--eval_samples", "2", "--group_size", "2",
              "--batch_size", "4", "--grad_accum", "1", "--max_new_tokens", "4"],
        grpo_eval=["--prompts", "4", "--samples", "2", "--max_new_tokens", "4"], warm_sft="400")
    full = dict(common, data=["--corpus", "openwebtext"], tokenizer=["--corpus", "openweb-800k"],
                pretrain=["--preset", "full", "--corpus", "openwebtext"])
    # GRPO on a CPU: one process per core (1 thread each) rolls out half the prompts each, the same global batch
    # (--grad_accum 1 x 2 processes for 2 x 1) and the same figures as one process, 1.2x faster on 2 cores.
    cores = 2 if (os.cpu_count() or 1) >= 2 else 1
    cpu = dict(common, pretrain=["--preset", "cpu"], grpo=["--grad_accum", str(2 // cores)], grpo_procs=cores)
    return {"cpu": cpu, "full": full, "tiny": tiny}


@dataclass
class Step:
    """One command of a stage. A training step (run set: its --out_dir) is done when its summary.json says
    finished, and resumed when a checkpoint is there; another step is done when `makes` is newer than `needs`."""
    stage: str
    argv: list
    run: Path | None = None
    makes: Path | None = None
    needs: Path | None = None
    procs: int = 1  # more than one: launched by torchrun, one process per GPU (or CPU core for GRPO's rollouts)

    def command(self) -> list:
        """As a user types it: torchrun in front when it takes more than one process."""
        return (["torchrun", "--standalone", f"--nproc_per_node={self.procs}"] if self.procs > 1 else []) + list(map(str, self.argv))

    def done(self) -> bool:
        if self.run is not None:
            summary = self.run / "summary.json"
            return summary.is_file() and json.loads(summary.read_text()).get("finished") is True
        return self.makes.exists() and (self.needs is None or self.makes.stat().st_mtime >= newest(self.needs))


def newest(path: Path) -> float:
    return max([p.stat().st_mtime for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()] or [0.0])


def plan(preset: str, out: Path, gpus: int) -> dict:
    """{stage: [Step]}: the commands of every stage, with this preset's flags and every path under OUT."""
    p, py = presets(out, gpus)[preset], lambda script, *a: [script, *map(str, a)]
    tok, tokens, d = out / "data" / "tokenizer.json", out / "data" / "tokens", out / "data"
    paths = ["--tokenizer", str(tok)]
    chat = lambda run: run / "ckpt_best"  # noqa: E731
    evaluate = lambda ckpt: Step("eval", py("09_eval/eval.py", "--checkpoint", ckpt, *paths, "--data_dir", tokens,  # noqa: E731
                                            "--bench_dir", d / "eval", *p["eval"]), makes=ckpt / "eval.json", needs=ckpt)
    train = lambda stage, script, run, *a, procs=max(gpus, 1): Step(stage, py(script, *paths, "--out_dir", run, *a), run=run, procs=procs)  # noqa: E731
    warm_data = d / "grpo" / "choice_sft.jsonl"
    final = chat(out / "grpo")
    return {
        "data": [Step("data", py("01_tokenizer/tokenizer.py", "--out", tok, *p["tokenizer"]), makes=tok),
                 Step("data", py("01_tokenizer/prepare.py", *paths, "--out_dir", tokens, *p["data"]), makes=tokens / "meta.json", needs=tok)],
        "pretrain": [train("pretrain", "07_pretrain_ddp/train.py", out / "pretrain", "--data_dir", tokens, *p["pretrain"])],
        "eval": [evaluate(chat(out / "pretrain"))],
        "sft": [train("sft", "08_sft/sft.py", out / "sft", "--base", chat(out / "pretrain"), "--data_dir", d / "sft", *p["sft"]),
                evaluate(chat(out / "sft"))],
        "dpo": [train("dpo", "10_dpo/dpo.py", out / "dpo", "--base", chat(out / "sft"), "--data_dir", d / "dpo", *p["dpo"]),
                evaluate(chat(out / "dpo"))],
        "grpo": [Step("grpo", py("11_grpo/data.py", "--sft", p["warm_sft"], "--data_dir", d / "grpo"), makes=warm_data),
                 train("grpo", "08_sft/sft.py", out / "warmup1", "--base", chat(out / "sft"), "--data", warm_data, *p["warm1"]),
                 train("grpo", "08_sft/sft.py", out / "warmup2", "--base", chat(out / "warmup1"), "--data", warm_data, *p["warm2"]),
                 train("grpo", "11_grpo/grpo.py", out / "grpo", "--base", chat(out / "warmup2"), "--data_dir", d / "grpo", *p["grpo"],
                       procs=p["grpo_procs"] or max(gpus, 1)),
                 Step("grpo", py("11_grpo/eval.py", "--checkpoint", chat(out / "warmup2"), final, *paths, "--task", "choice",
                                 "--data_dir", d / "grpo", *p["grpo_eval"], "--json", out / "grpo" / "pass_at_k.json"),
                      makes=out / "grpo" / "pass_at_k.json", needs=final)],
        "gguf": [Step("gguf", py("06_model/gguf.py", "export", "--checkpoint", final, *paths, "--out", out / "gguf" / "lillm-q8_0.gguf",
                                 "--type", "q8_0"), makes=out / "gguf" / "lillm-q8_0.gguf", needs=final)],
        "serve": [Step("serve", ["serve", final, tok], makes=out / "serve" / "smoke.json", needs=final)],
    }


def run_step(step: Step, log, stopping: dict) -> int:
    """Run one command, its output appended to the stage's log; a training step resumes its own checkpoint."""
    if step.argv[0] == "serve":
        return serve_smoke(Path(step.makes).parent, step.argv[1], step.argv[2], log)
    argv = list(step.argv)
    if step.run is not None and ((step.run / "ckpt_latest").is_dir() or (step.run / "ckpt_latest.old").is_dir()):
        argv.append("--resume")  # the lesson's own resume: the same numbers as a run that never stopped
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={step.procs}"] if step.procs > 1 else [sys.executable]
    log.write(f"$ {' '.join(map(str, [*launcher, *argv]))}\n")
    log.flush()
    # Its own session: a Ctrl-C at the terminal reaches the pipeline alone, which passes it on once (a second
    # Ctrl-C would kill a training stage at once, without its checkpoint).
    proc = subprocess.Popen([*launcher, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stopping["proc"] = proc
    code = proc.wait()
    stopping["proc"] = None
    return code


def torch_gpus() -> int:
    import torch  # only the full preset's launcher asks

    return torch.cuda.device_count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_smoke(out: Path, checkpoint, tokenizer, log) -> int:
    """Lesson 12's server on the final chat model, on a free loopback port; one streamed answer through the official
    openai client, its time to first token and tokens/s written to OUT/serve/smoke.json; the server stopped."""
    import httpx
    from openai import OpenAI

    port = free_port()
    argv = [sys.executable, "12_serve/serve.py", "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer), "--port", str(port)]
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    server = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # up to 2 minutes for the server to load the model
            if server.poll() is not None:
                return server.returncode or 1
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = OpenAI(base_url=url + "/v1", api_key="pipeline", max_retries=0, timeout=120)
        start, first, text, usage = time.perf_counter(), None, "", None
        for chunk in client.chat.completions.create(model="lillm", messages=[{"role": "user", "content": QUESTION}], max_tokens=32,
                                                    temperature=0, stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        seconds = time.perf_counter() - start
        result = {"question": QUESTION, "answer": text, "completion_tokens": usage.completion_tokens,
                  "ttft_s": round((first or time.perf_counter()) - start, 4), "seconds": round(seconds, 4),
                  "tokens_per_s": round(usage.completion_tokens / seconds, 1), "client": "openai", "url": url}
        out.mkdir(parents=True, exist_ok=True)
        (out / "smoke.json").write_text(json.dumps(result, indent=2) + "\n")
        log.write(json.dumps(result) + "\n")
        return 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def last_error(log_path: Path) -> str:
    """The stage's own one-line error (its last `error: ...` line), else the log's last line."""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors or lines or ["(no output)"])[-1].removeprefix("error: ")


def human(seconds: float) -> str:
    return f"{round(seconds) // 60} min {round(seconds) % 60:02d} s" if seconds >= 60 else f"{seconds:.1f} s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole pipeline (tokenizer -> ... -> serving) and write its report card.")
    parser.add_argument("--preset", choices=["cpu", "full", "tiny"], default=None, help="cpu: 2 cores, ~25 min; full: the seed's "
                        "recipe on GPUs; tiny: seconds per stage (tests) [full with a GPU, else cpu]")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--out_dir", default="out/pipeline", help="every stage's outputs, the logs and the report card")
    args = parser.parse_args(argv)
    report = import_report()
    out, stages = Path(args.out_dir), args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        return fail(f"unknown stage(s) {', '.join(unknown)}; pick from {','.join(STAGES)}")
    gpus = torch_gpus() if args.preset in (None, "full") else 0
    preset = args.preset or ("full" if gpus else "cpu")
    record_path = out / "pipeline.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"preset": preset, "steps": {}}
    if record["preset"] != preset:
        return fail(f"{out} holds a pipeline run of preset {record['preset']}, not {preset}; use another --out_dir")
    steps = plan(preset, out, gpus)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    stopping = {"proc": None, "signal": None}

    def on_signal(signum, frame):  # pass it on to the running stage, once; then stop after it
        if stopping["signal"] is None and stopping["proc"] is not None:
            os.killpg(stopping["proc"].pid, signal.SIGTERM)
        stopping["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    chosen = [s for s in STAGES if s in stages]
    for k, stage in enumerate(chosen, 1):
        todo = [step for step in steps[stage] if not step.done()]
        label = f"[{k}/{len(chosen)}] {stage:<9}"
        if not todo:
            print(f"{label} skipped (done): {report.headline(stage, out)}", flush=True)
            continue
        print(f"{label} running ... (log: {out / 'logs' / (stage + '.log')})", flush=True)
        started = time.perf_counter()
        with open(out / "logs" / f"{stage}.log", "a") as log:
            for step in todo:
                code = run_step(step, log, stopping)
                if stopping["signal"]:
                    save(record_path, record)
                    return fail(f"stage {stage} stopped by {stopping['signal']}; rerun the same command to continue it "
                                f"(log: {out / 'logs' / (stage + '.log')})")
                if code != 0 or not step.done():
                    return fail(f"stage {stage} failed: {last_error(out / 'logs' / (stage + '.log'))} (log: {out / 'logs' / (stage + '.log')})")
        seconds = time.perf_counter() - started
        record["steps"][stage] = {"seconds": round(seconds, 1), "commands": [s.command() for s in steps[stage]]}
        save(record_path, record)
        print(f"{label} done in {human(seconds)}: {report.headline(stage, out)}", flush=True)
    written = report.write(out, record, steps)
    print(f"report card: {written}")
    return 0


def import_report():
    sys.path.insert(0, str(ROOT))
    import report  # noqa: E402  beside this file: the report card

    return report


def save(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
