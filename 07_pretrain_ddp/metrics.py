"""What a run reports: metrics.jsonl, the loss plot, MFU against a peak, and a sample at the end.

    metrics.jsonl   one JSON record per optimizer step: loss, lr, grad_norm, tokens_per_s, mfu (+ val_loss)
    MFU           = training FLOPs per token x tokens per second / (peak FLOP/s per process x processes)

LogWindow keeps the figures of the steps since the last log step on the device and reads them with one
all-reduce and one transfer, so that a GPU never waits for the host inside a window.

The peak of a GPU is its spec sheet's dense bf16 figure (TF32 for float32 matmuls: half). A CPU has
no spec sheet, so its peak is measured: one core's best float32 matmul speed, timed in the thread's
own CPU seconds (another process taking the core stretches wall time, not those), times the threads
training uses. A wall-clock timing on a busy machine came out low and MFU over 100%.
--peak_tflops replaces either with a figure of your own.

Demo: python 07_pretrain_ddp/metrics.py   (writes /tmp/lillm_loss_demo.png)
"""

import json
import math
import re
import sys
import time
from importlib import import_module
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no window: works on a headless server
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
tokenizer_lib = import_module("01_tokenizer.tokenizer")
generate = import_module("06_model.generate")
stage = import_module("07_pretrain_ddp.stage")  # TrainError

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


def peak_flops(run, dtype: str, given_tflops: float = 0.0) -> float:
    """FLOP/s one process's device can do at best, the denominator of MFU (0: unknown GPU)."""
    if given_tflops:
        return given_tflops * 1e12
    device = run.device
    if run.ddp:
        dist.barrier()  # measure a CPU's peak while all processes run, as they will while training
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


class LogWindow:
    """The steps since the last log step, as train_step left them: on the device. A log step reads them all at once:
    one all-reduce sums the window's losses and figures over ranks and says whether any rank got a stop signal (so
    that all stop at the same step), one .tolist() brings everything to the host. Reading a loss at every step
    instead would make the host wait for the GPU at every step. Time is measured per window, for the same reason:
    inside it a GPU runs ahead of the host, so one step's own time means nothing."""

    def __init__(self, run, flops_per_token: float, peak: float, out_dir):
        self.run, self.flops_per_token, self.peak, self.out_dir = run, flops_per_token, peak, out_dir
        self.restart()

    def restart(self) -> None:
        self.pending, self.t0 = [], time.perf_counter()  # per step: (lr, loss_sum, n, grad_norm, figures, tokens)

    def add(self, lr: float, step_result: tuple, tokens: int) -> None:
        self.pending.append((lr, *step_result, tokens))

    def read(self, step: int, stopping: bool) -> tuple:
        """(one record per step of the window, whether any rank is stopping); a TrainError if a value is not finite."""
        pending, run = self.pending, self.run
        names = list(pending[0][4])  # the objective's own figures, summed like the loss
        sums = [torch.stack([p[1], *p[4].values()]) for p in pending]  # per step (1 + figures,)
        shared = torch.cat(sums + [torch.tensor([float(stopping)], device=run.device)])
        if run.ddp:
            dist.all_reduce(shared)
        n, width = len(pending), len(names) + 1  # the gradient norms are alike on every rank: read, not reduced
        means = shared[:-1].view(n, width) / torch.stack([p[2] for p in pending])[:, None]  # per unit (token, pair)
        values = torch.cat([means.flatten(), torch.stack([p[3] for p in pending]), shared[-1:]]).tolist()
        dt = (time.perf_counter() - self.t0) / n
        records = []
        for i, (lr, *_, tokens) in enumerate(pending):
            row, norm = values[i * width : (i + 1) * width], values[n * width + i]  # (loss, *figures), grad norm
            record = {"step": step - n + 1 + i, "loss": row[0], "lr": lr, "grad_norm": norm, "tokens_per_s": tokens / dt,
                      "mfu": self.flops_per_token * tokens / dt / (self.peak * run.world) if self.peak else None}
            if not (math.isfinite(row[0]) and math.isfinite(norm)):
                raise stage.TrainError(f"loss {row[0]} / gradient norm {norm} at step {record['step']} is not finite; "
                                       f"stopped without saving, the last good checkpoint stays in {self.out_dir} "
                                       "(lower --lr or raise --warmup_steps)")
            records.append(record | dict(zip(names, row[1:])))
        return records, values[-1] > 0


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

    def validation(self, record: dict, is_best: bool) -> None:
        figures = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_"))
        self.say(f"step {record['step']}: {figures}{' (best so far)' if is_best else ''}")

    def say(self, line: str) -> None:
        if self.master:
            print(line)

    def plot(self, path: Path, what: str = "loss") -> None:
        if self.master:
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
    peak = peak_flops(stage.Run(False, 0, 0, 1, torch.device("cpu")), "float32")
    print(f"wrote /tmp/lillm_loss_demo.png; this CPU's float32 peak on {torch.get_num_threads()} thread(s): {peak / 1e9:.1f} GFLOP/s")
