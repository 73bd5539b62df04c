"""What a run reports: metrics.jsonl, the loss plot, MFU against a peak, and a sample at the end.

    metrics.jsonl   one JSON record per optimizer step: loss, lr, grad_norm, tokens_per_s, mfu (+ val_loss)
    MFU           = training FLOPs per token x tokens per second / (peak FLOP/s per process x processes)

The peak of a GPU is its spec sheet's dense bf16 figure (TF32 for float32 matmuls: half). A CPU has
no spec sheet, so its peak is measured: one core's best float32 matmul speed, timed in the thread's
own CPU seconds (another process taking the core stretches wall time, not those), times the threads
training uses. A wall-clock timing on a busy machine came out low and MFU over 100%.
--peak_tflops replaces either with a figure of your own.

Demo: python 07_pretrain_ddp/metrics.py   (writes /tmp/lillm_loss_demo.png)
"""

import json
import re
import sys
import time
from importlib import import_module
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no window: works on a headless server
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
tokenizer_lib = import_module("01_tokenizer.tokenizer")
generate = import_module("06_model.generate")
config = import_module("07_pretrain_ddp.config")

# Dense bf16 tensor-core TFLOP/s from NVIDIA's data sheets, matched against torch.cuda.get_device_name:
# the first pattern that matches wins, so the specific parts (H100 PCIe, L40S) come before the general ones.
# Another GPU: MFU is not shown unless --peak_tflops gives its figure.
GPU_PEAK_TFLOPS = [
    (r"H100.*(PCIe|PCIE)", 756), (r"H100 NVL", 835), (r"H100", 989),  # H100 SXM5
    (r"H200 NVL", 835), (r"H200", 989),  # H200 SXM
    (r"B200", 2250), (r"A100", 312), (r"\bA10\b", 125),
    (r"L40S", 362), (r"L40\b", 181), (r"\bL4\b", 121),
    (r"RTX 4090", 165), (r"RTX 3090", 71),
]


def peak_flops(device: torch.device, dtype: str, given_tflops: float = 0.0) -> float:
    """FLOP/s one process's device can do at best, the denominator of MFU (0: unknown GPU)."""
    if given_tflops:
        return given_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = next((v for pattern, v in GPU_PEAK_TFLOPS if re.search(pattern, name)), 0)
        return tflops * 1e12 * (1.0 if dtype == "bfloat16" else 0.5)  # float32 matmuls run as TF32: half rate
    # One core's speed, timed in this thread's CPU seconds: a core that another process takes for a while
    # stretches the wall clock, not this thread's CPU time, so a busy machine cannot make the peak look low.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread runs the matmul inline, in this very thread
    try:
        a = torch.ones(1024, 1024)  # not randn: drawing from the RNG here would shift a resumed run's dropout masks
        a @ a  # warm-up: caches
        seconds = min(thread_seconds(lambda: a @ a) for _ in range(10))
    finally:
        torch.set_num_threads(threads)
    return threads * 2 * 1024**3 / seconds  # every thread training uses is a core at that speed


def thread_seconds(fn) -> float:
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def describe_run(cfg: dict, run, model, lines: list[str]) -> None:
    """Rank 0 prints the resolved config, the git revision and the stage's lines, and writes config.json."""
    if run.master:
        revision = config.git_revision()
        print(f"config: {json.dumps(cfg, sort_keys=True)}\ngit revision: {revision}", *lines, sep="\n")
        Path(cfg["out_dir"]).mkdir(parents=True, exist_ok=True)
        saved = dict(cfg, git_revision=revision, world_size=run.world, model=model.config.to_dict())
        (Path(cfg["out_dir"]) / "config.json").write_text(json.dumps(saved, indent=2))


def window_records(pending: list, losses: list, norms: list, step: int, seconds: float, flops_per_token: float, peak: float,
                   world: int):
    """The records of a log window's steps, from (lr, ..., tokens) per step and the losses and gradient norms read back.
    Time is measured per window: inside it a GPU runs ahead of the host, so a step's own time means nothing."""
    dt = seconds / len(pending)
    for k, loss, grad_norm, (lr, *_, tokens) in zip(range(step - len(pending) + 1, step + 1), losses, norms, pending):
        yield {"step": k, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt,
               "mfu": flops_per_token * tokens / dt / (peak * world) if peak else None}


class Metrics:
    """metrics.jsonl on rank 0; resuming at step k drops records past k (work that was lost)."""

    def __init__(self, path: Path, start_step: int, master: bool, wandb_config: dict | None = None):
        self.path, self.master, self.records, self.wandb = Path(path), master, [], None
        if master and wandb_config:  # optional: wandb is imported only when asked for
            self.wandb = import_module("wandb").init(project=wandb_config["wandb_project"], config=wandb_config)
        if master and start_step > 0 and self.path.exists():
            self.records = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= start_step]
        if master:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        if self.master:
            self.records.append(record)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb:
                self.wandb.log(record, step=record["step"])

    def progress(self, record: dict, max_steps: int) -> None:
        if self.master:
            mfu = f" | MFU {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""
            print(f"step {record['step']}/{max_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | grad norm "
                  f"{record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s{mfu}")

    def plot(self, path: Path, what: str = "loss") -> None:
        plot_losses(self.records, path, what)
        print(f"wrote {path}: train and validation {what} against optimizer steps")


def plot_losses(records: list, path, what: str = "loss") -> None:
    """Training loss per step and validation loss per evaluation, on one pair of axes, as a PNG."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    if train:
        ax.plot(*zip(*train), color="tab:blue", linewidth=1.2, label=f"train {what}")
    if val:
        ax.plot(*zip(*val), color="tab:red", marker="o", markersize=4, label=f"validation {what}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{what} (cross-entropy, nats per token)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sample(model, tokenizer_path, prompt: str, n_tokens: int, seed: int, device: torch.device) -> str:
    """A sample continuing `prompt` at the start of a new document (after </s>), reproducibly."""
    tok = tokenizer_lib.load_tokenizer(tokenizer_path)
    ids = [tokenizer_lib.EOT_ID] + tok.encode(prompt, add_special_tokens=False).ids
    generator = torch.Generator(device).manual_seed(seed)  # its own RNG: the sample does not depend on training's
    new = generate.generate(model, [ids], n_tokens, temperature=0.8, top_k=200, generator=generator)[0]
    return tok.decode(ids[1:] + new, skip_special_tokens=False)


if __name__ == "__main__":
    import math

    records = [{"step": s, "loss": 3 + 6 * math.exp(-s / 40) + 0.1 * math.sin(s)} for s in range(1, 201)]
    records += [{"step": s, "val_loss": 3.2 + 6 * math.exp(-s / 40)} for s in range(0, 201, 25)]
    plot_losses(sorted(records, key=lambda r: r["step"]), "/tmp/lillm_loss_demo.png")
    peak = peak_flops(torch.device("cpu"), "float32")
    print(f"wrote /tmp/lillm_loss_demo.png; this CPU's float32 peak on {torch.get_num_threads()} thread(s): {peak / 1e9:.1f} GFLOP/s")
