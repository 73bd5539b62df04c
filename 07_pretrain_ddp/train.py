"""Pretraining LilLM with DistributedDataParallel: one file from one CPU process to many GPU nodes.

    each rank:  loss_r = mean cross-entropy of its micro-batches       (its own, disjoint windows)
    backward:   g = (1 / W) sum_r grad loss_r                          (DDP all-reduces while backward runs)
    update:     AdamW(g clipped to norm 1), lr = warmup, then cosine to min_lr at max_steps

Every rank holds the whole model and optimizer and sees other data; DDP averages the gradients so
every rank takes the same step (notes.md: what is all-reduced when, and torchrun's rendezvous).
The global batch is batch_size x max_seq_len x grad_accum x world_size tokens.

Commands (from the repository root; README.md has the full recipe):
    python 07_pretrain_ddp/train.py                            # CPU preset, ~10 min on 2 cores, fresh clone
    torchrun --standalone --nproc_per_node=2 07_pretrain_ddp/train.py --preset cpu   # 2 processes, Gloo
    python 07_pretrain_ddp/train.py --preset full              # the seed's recipe on 1 GPU (grad_accum 32)
    torchrun --standalone --nproc_per_node=8 07_pretrain_ddp/train.py --preset full  # 8 GPUs (grad_accum 4)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
             --rdzv_id=lillm 07_pretrain_ddp/train.py --preset full   # the same on each of 2 nodes
    python 07_pretrain_ddp/train.py --resume                   # continue out/ckpt_latest exactly
The full preset trains on OpenWebText; tokenize it once before launching many processes (hours):
    python 01_tokenizer/tokenizer.py --corpus openweb-800k --out data/openwebtext/tokenizer.json
    python 01_tokenizer/prepare.py --corpus openwebtext --out-dir data/openwebtext --tokenizer data/openwebtext/tokenizer.json
Left out on purpose: FSDP/tensor parallelism (the model fits one GPU), fp16 with loss scaling,
document masking, a data-loader process (reading a memmap costs microseconds per window).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from importlib import import_module
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
lillm = import_module("06_model.model")
prepare = import_module("01_tokenizer.prepare")
tokenizer_lib = import_module("01_tokenizer.tokenizer")
data = import_module("07_pretrain_ddp.data")
checkpoint = import_module("07_pretrain_ddp.checkpoint")
plot = import_module("07_pretrain_ddp.plot")
bench = import_module("07_pretrain_ddp.bench")  # peak_flops, the denominator of MFU

MODEL_FIELDS = ("d_model", "n_layers", "q_heads", "kv_heads", "max_seq_len", "multiple_of", "dropout")
FULL = dict(  # the seed's recipe: the 39.6M model, 524,288 tokens per step, ~10B tokens of OpenWebText
    corpus="openwebtext", data_dir="data/openwebtext", tokenizer="data/openwebtext/tokenizer.json", out_dir="out",
    d_model=512, n_layers=12, q_heads=16, kv_heads=8, max_seq_len=512, multiple_of=128, dropout=0.0,
    batch_size=32, grad_accum=1, global_batch_tokens=524288, max_steps=20000,
    lr=6e-4, min_lr=6e-5, warmup_steps=715,  # warmup: GPT-3's 375M tokens
    weight_decay=0.1, grad_clip=1.0, eval_interval=250, eval_tokens=2**20, log_interval=10,
    seed=1337, device="auto", dtype="auto", compile=True, peak_tflops=0.0,
    wandb=False, wandb_project="lillm", sample_tokens=200, prompt="", stop_at=0, resume=False,
)
PRESETS = {
    "cpu": dict(FULL, corpus="shakespeare", data_dir="data/shakespeare", tokenizer="data/tokenizer.json",
                d_model=192, n_layers=4, q_heads=6, kv_heads=3, max_seq_len=256, multiple_of=64,
                batch_size=8, global_batch_tokens=0, max_steps=900, lr=2e-3, min_lr=2e-4, warmup_steps=30,
                eval_interval=150, eval_tokens=2**15, compile=False),
    "full": FULL,
}


class TrainError(Exception):
    """Bad input that the user can fix: printed as one line, `error: ...`."""


def parse_args(argv=None) -> dict:
    """Only the flags given on the command line: presets (or, with --resume, the checkpoint) fill in the rest."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)

    def flag(name, help, **kw):
        values = {str(v[name]) for v in PRESETS.values()}
        shown = f"default {values.pop()}" if len(values) == 1 else ", ".join(f"{k}: {v[name]}" for k, v in PRESETS.items())
        p.add_argument(f"--{name}", help=f"{help} [{shown}]", **kw)

    p.add_argument("--preset", choices=PRESETS, help="defaults for every flag below [full on a GPU, else cpu]")
    p.add_argument("--resume", action="store_true", help="continue OUT_DIR/ckpt_latest with its saved config; flags given override it")
    flag("corpus", "corpus for lesson 01 to tokenize when DATA_DIR has no token files")
    flag("data_dir", "directory with train.bin, val.bin, meta.json (built by lesson 01 if missing)")
    flag("tokenizer", "tokenizer.json the token files were made with (checked by sha256)")
    flag("out_dir", "checkpoints (ckpt_latest/, ckpt_best/), config.json, metrics.jsonl, loss.png")
    for name, kind, what in [("d_model", int, "model width"), ("n_layers", int, "transformer blocks"),
                             ("q_heads", int, "query heads"), ("kv_heads", int, "key/value heads (GQA)"),
                             ("max_seq_len", int, "tokens per training window = the model's context"),
                             ("multiple_of", int, "SwiGLU hidden size is rounded up to this"), ("dropout", float, "dropout rate")]:
        flag(name, f"model: {what}", type=kind)
    flag("batch_size", "micro-batch: windows per process per forward pass", type=int)
    flag("grad_accum", "micro-steps per optimizer step (ignored when --global_batch_tokens is set)", type=int)
    flag("global_batch_tokens", "tokens per optimizer step; grad_accum = this / (batch_size x max_seq_len x world_size); "
         "0: use --grad_accum", type=int)
    flag("max_steps", "optimizer steps; the learning rate reaches min_lr at the last one", type=int)
    flag("lr", "peak learning rate", type=float)
    flag("min_lr", "final learning rate (cosine decay ends here at max_steps)", type=float)
    flag("warmup_steps", "linear warmup steps", type=int)
    flag("weight_decay", "AdamW weight decay, on weight matrices only", type=float)
    flag("grad_clip", "clip the gradient's global norm to this; 0: no clipping", type=float)
    flag("eval_interval", "evaluate (all ranks) and checkpoint every this many steps", type=int)
    flag("eval_tokens", "validation tokens per evaluation, in windows spread over val.bin (all of it if fewer)", type=int)
    flag("log_interval", "print a progress line every this many steps (metrics.jsonl gets every step)", type=int)
    flag("seed", "seed for the model's initialization, the data order and dropout", type=int)
    flag("device", "auto: cuda:LOCAL_RANK if there is a GPU, else cpu", choices=["auto", "cpu", "cuda"])
    flag("dtype", "auto: bfloat16 autocast on GPU, float32 on CPU", choices=["auto", "float32", "bfloat16"])
    flag("compile", "torch.compile the model", action=argparse.BooleanOptionalAction)
    flag("peak_tflops", "peak TFLOP/s of one process's device, for MFU; 0: known GPUs, or measured on CPU", type=float)
    flag("wandb", "log to Weights & Biases (imported only then)", action=argparse.BooleanOptionalAction)
    flag("wandb_project", "Weights & Biases project")
    flag("sample_tokens", "tokens to generate from the trained model at the end; 0: none", type=int)
    flag("prompt", "text the end-of-run sample continues (after </s>, i.e. at a document start)")
    flag("stop_at", "save and exit at this step as on SIGTERM, the schedule still ending at max_steps (job slots); 0: off", type=int)
    return vars(p.parse_args(argv))


def resolve_config(given: dict, saved: dict | None = None) -> dict:
    """Flags given > the checkpoint's config (with --resume) > the preset."""
    if saved is None:
        preset = given.get("preset") or ("full" if torch.cuda.is_available() and given.get("device") != "cpu" else "cpu")
        cfg = dict(PRESETS[preset], preset=preset)
    else:
        cfg = dict(saved, resume=False, stop_at=0)  # those two belong to one invocation, not to the run
        if given.get("preset", cfg["preset"]) != cfg["preset"]:
            raise TrainError(f"--preset {given['preset']} differs from the checkpoint's {cfg['preset']}; a resumed run keeps its preset")
        changed = [f"--{k} {given[k]} (checkpoint: {saved[k]})" for k in MODEL_FIELDS if k in given and given[k] != saved[k]]
        if changed:
            raise TrainError(f"--resume with a different model config: {', '.join(changed)}")
    if "grad_accum" in given and given.get("global_batch_tokens"):
        raise TrainError("give --grad_accum or --global_batch_tokens, not both")
    if "grad_accum" in given:
        cfg["global_batch_tokens"] = 0  # an explicit accumulation count replaces the preset's global batch
    cfg.update({k: v for k, v in given.items() if k != "preset"})
    for k in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_tokens", "log_interval"):
        if cfg[k] < 1:
            raise TrainError(f"--{k} {cfg[k]}: must be at least 1")
    for k in ("global_batch_tokens", "weight_decay", "grad_clip", "sample_tokens", "stop_at", "peak_tflops"):
        if cfg[k] < 0:
            raise TrainError(f"--{k} {cfg[k]}: must not be negative")
    if not 0 < cfg["min_lr"] <= cfg["lr"] or not 0 <= cfg["warmup_steps"] < cfg["max_steps"]:
        raise TrainError(f"need 0 < min_lr <= lr and 0 <= warmup_steps < max_steps, got min_lr {cfg['min_lr']}, "
                         f"lr {cfg['lr']}, warmup_steps {cfg['warmup_steps']}, max_steps {cfg['max_steps']}")
    return cfg


def lr_at(step: int, max_lr: float, min_lr: float, warmup: int, max_steps: int) -> float:
    """Learning rate of update step+1 of max_steps: linear warmup to max_lr at update `warmup`, then a half
    cosine down to min_lr, reached exactly at the last update (the seed's decay horizon lay past the end)."""
    k = step + 1
    if k <= warmup:
        return max_lr * k / warmup
    progress = min(1.0, (k - warmup) / (max_steps - warmup))
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on the weight matrices of attention and FFN only.

    Norm gains are left alone: decay would pull them toward 0, where they are scales meant to sit near 1.
    The embedding, tied with the output head, is not decayed either: it is one row per token, and decay
    shrinks every row every step while a rare token's row gets a gradient only when that token occurs,
    so rare tokens would fade toward zero. (nanoGPT decays its tied matrix; Llama-style recipes do not.)
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # the tied matrix appears once, as tok_embeddings.weight
        (decay if p.dim() == 2 and "tok_embeddings" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters instead of a loop of small ops (PyTorch has it for CUDA and CPU)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type in ("cuda", "cpu"))


def setup_distributed(device_flag: str):
    """(ddp, rank, local_rank, world_size, device). torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda, but torch sees no GPU (a CPU build of torch, or no driver)")
    use_cuda = device_flag != "cpu" and torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if ddp:
        if use_cuda:
            torch.cuda.set_device(device)
        # NCCL moves GPU tensors over NVLink/InfiniBand; Gloo moves CPU tensors over TCP.
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return ddp, rank, local_rank, world_size, device


def git_revision() -> str:
    try:
        run = lambda *cmd: subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        return run("rev-parse", "--short", "HEAD") + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout or no commit)"


def build_then_barrier(build, builder: bool, ddp: bool) -> None:
    """Run build() on the builder rank while the others wait at a barrier. Its DataError is raised after the
    barrier, so the other ranks are not left waiting for a rank that died."""
    error = None
    if builder:
        try:
            build()
        except prepare.DataError as e:
            error = e
    if ddp:
        dist.barrier()
    if error:
        raise error


def load_data(cfg: dict, local_rank: int, ddp: bool) -> dict:
    """Lesson 01's meta dict; its token files are built first (once per node) when missing."""
    builder = local_rank == 0 and not (Path(cfg["data_dir"]) / "meta.json").exists()
    if builder:
        print(f"no token files in {cfg['data_dir']}: building them with lesson 01 from corpus {cfg['corpus']!r}")
    build_then_barrier(lambda: prepare.ensure_data(cfg["data_dir"], cfg["tokenizer"], cfg["corpus"]), builder, ddp)
    meta = prepare.load_meta(cfg["data_dir"])
    tokenizer_lib.load_tokenizer(cfg["tokenizer"])  # a one-line DataError if it is missing or unreadable
    prepare.check_tokenizer(meta, cfg["tokenizer"], cfg["data_dir"])
    return meta


def main(argv=None) -> None:
    """Flags -> config -> train; bad input becomes one line on stderr (`error: ...`) and exit code 2."""
    try:
        given = parse_args(argv)
        cfg, state = resolve_config(given), None
        if given.get("resume"):
            state = checkpoint.load_state(Path(cfg["out_dir"]) / "ckpt_latest")
            cfg = resolve_config(given, state["config"])
        elif checkpoint.find(Path(cfg["out_dir"]) / "ckpt_latest") or checkpoint.find(Path(cfg["out_dir"]) / "ckpt_best"):
            raise TrainError(f"{cfg['out_dir']} already holds a checkpoint: pass --resume to continue it, or another --out_dir")
        ddp, rank, local_rank, world_size, device = setup_distributed(cfg["device"])
        try:
            train(cfg, state, ddp, rank, local_rank, world_size, device)
        finally:
            if ddp:
                dist.destroy_process_group()
    except (TrainError, prepare.DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, which handles it itself
        print("error: interrupted outside the training loop; the checkpoints on disk are complete", file=sys.stderr)
        sys.exit(2)


def train(cfg, state, ddp, rank, local_rank, world_size, device):
    master = rank == 0  # rank 0 alone prints, logs and writes files
    out_dir, B, T, W = Path(cfg["out_dir"]), cfg["batch_size"], cfg["max_seq_len"], world_size
    if cfg["global_batch_tokens"]:  # the global batch is fixed; the accumulation makes up for fewer processes
        if cfg["global_batch_tokens"] % (B * T * W):
            raise TrainError(f"--global_batch_tokens {cfg['global_batch_tokens']:,} is not a multiple of batch_size {B} x max_seq_len {T} "
                             f"x world_size {W} = {B * T * W:,}; change --batch_size or the number of processes")
        cfg["grad_accum"] = cfg["global_batch_tokens"] // (B * T * W)
    A, tokens_per_step = cfg["grad_accum"], B * T * cfg["grad_accum"] * W
    dtype = cfg["dtype"] if cfg["dtype"] != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    revision = git_revision()
    if master:
        print(f"config: {json.dumps(cfg, sort_keys=True)}\ngit revision: {revision}\n"
              f"global batch = {B} windows x {T} tokens x {A} micro-steps x {W} processes = {tokens_per_step:,} tokens per step")
    meta = load_data(cfg, local_rank, ddp)
    try:
        model_cfg = lillm.ModelConfig(vocab_size=meta["vocab_size"], **{k: cfg[k] for k in MODEL_FIELDS})
    except ValueError as e:
        raise TrainError(f"invalid model config: {e}") from None
    train_data = data.TokenWindows(Path(cfg["data_dir"]) / "train.bin", meta["train_tokens"], T)
    val_data = data.TokenWindows(Path(cfg["data_dir"]) / "val.bin", meta["val_tokens"], T)
    if min(train_data.n_windows, val_data.n_windows) < 1:
        raise TrainError(f"train.bin or val.bin in {cfg['data_dir']} is shorter than one window of max_seq_len + 1 = {T + 1} tokens")

    torch.manual_seed(cfg["seed"] + rank)  # different dropout masks per rank; DDP copies rank 0's weights anyway
    step, best_val, position = 0, float("inf"), 0
    if state is None:
        raw_model = lillm.LilLM(model_cfg).to(device)
    else:
        raw_model = checkpoint.load_model(out_dir / "ckpt_latest", device)
        if raw_model.config.vocab_size != meta["vocab_size"]:
            raise TrainError(f"the checkpoint's model has vocab_size {raw_model.config.vocab_size}, "
                             f"the token files in {cfg['data_dir']} vocab_size {meta['vocab_size']}")
        if state["tokenizer_sha256"] != meta["tokenizer_sha256"]:
            raise TrainError(f"the checkpoint was trained on tokens of tokenizer {state['tokenizer_sha256'][:12]}, "
                             f"the token files in {cfg['data_dir']} come from tokenizer {meta['tokenizer_sha256'][:12]}")
        if raw_model.config != model_cfg:
            raise TrainError(f"the checkpoint's model.safetensors ({raw_model.config}) does not match its train_state.pt ({model_cfg})")
        step, best_val, position = state["step"], state["best_val_loss"], state["data_position"]
    optimizer = make_optimizer(raw_model, cfg["lr"], cfg["weight_decay"], device)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if len(state["rng"]) == W:
            checkpoint.set_rng_state(state["rng"][rank])  # with another world size, dropout masks start afresh
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls outside autocast: TF32 tensor cores
    model = torch.compile(raw_model) if cfg["compile"] else raw_model
    # DDP broadcasts rank 0's weights at construction and registers hooks that all-reduce each bucket
    # of gradients as soon as backward has produced it, overlapping communication with computation.
    # forward_sync_buffers=False: the one buffer, the RoPE table, is computed alike on every rank, so the
    # default broadcast of buffers from rank 0 before every forward would be pure overhead.
    train_model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None, forward_sync_buffers=False) if ddp else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    sampler = data.RankSampler(data.WindowStream(train_data.n_windows, cfg["seed"]), B, rank, W, position)
    flops_per_token = raw_model.flops_per_token(T)
    if ddp:
        dist.barrier()  # measure a CPU's peak while all processes run, as they will while training
    peak = bench.peak_flops(device, dtype, cfg["peak_tflops"])
    if master:
        print(f"{raw_model.num_params():,} parameters, vocab {model_cfg.vocab_size:,}, on {device} in {dtype}, {W} process(es); "
              f"train.bin holds {train_data.n_windows:,} windows: one epoch = {train_data.n_windows * T / tokens_per_step:,.1f} steps")
        out_dir.mkdir(parents=True, exist_ok=True)
        saved = dict(cfg, git_revision=revision, world_size=W, model=model_cfg.to_dict())
        (out_dir / "config.json").write_text(json.dumps(saved, indent=2))
    metrics = Metrics(out_dir / "metrics.jsonl", step, master)
    if cfg["wandb"] and master:
        import wandb  # optional: only needed with --wandb
        metrics.wandb = wandb.init(project=cfg["wandb_project"], config=cfg)

    # The same validation windows at every evaluation, whatever the batch size and world size: evenly
    # spread over val.bin (not its first documents only), dealt to the ranks like cards.
    n_eval = max(1, min(val_data.n_windows, cfg["eval_tokens"] // T))
    my_eval_ids = np.linspace(0, val_data.n_windows - 1, n_eval).round().astype(np.int64)[rank::W]

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total = torch.zeros(2, device=device)  # (sum of window losses, windows)
        for i in range(0, len(my_eval_ids), B):
            x, y = val_data.batch(my_eval_ids[i : i + B], device)
            with autocast:
                total += torch.stack([model(x, y)[1].float() * len(x), torch.tensor(float(len(x)), device=device)])
        if ddp:
            dist.all_reduce(total)  # sums over ranks, then one division: every rank gets the same mean
        model.train()
        return (total[0] / total[1]).item()

    def save(val_loss, is_best: bool) -> None:
        rngs = [None] * W
        if ddp:
            dist.all_gather_object(rngs, checkpoint.rng_state())  # each rank's RNG, for an exact resume
        else:
            rngs = [checkpoint.rng_state()]
        if master:
            ts = {"step": step, "optimizer": optimizer.state_dict(), "rng": rngs, "data_position": sampler.position,
                  "config": cfg, "tokenizer_sha256": meta["tokenizer_sha256"], "best_val_loss": best_val,
                  "val_loss": val_loss, "lr": lr_at(step, cfg["lr"], cfg["min_lr"], cfg["warmup_steps"], cfg["max_steps"])}
            checkpoint.save(out_dir / "ckpt_latest", raw_model, ts)  # the unwrapped model: no "module." prefix
            if is_best:
                checkpoint.save(out_dir / "ckpt_best", raw_model, ts)

    with checkpoint.StopOnSignal() as signals:
        if step == 0:
            metrics.write({"step": 0, "val_loss": evaluate()})
        while step < cfg["max_steps"]:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg["lr"], cfg["min_lr"], cfg["warmup_steps"], cfg["max_steps"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(A):
                x, y = train_data.batch(sampler.next_ids(), device)
                # Skip DDP's gradient all-reduce on all micro-steps but the last: they add into the same
                # .grad, so one all-reduce of the sum gives the same average with A times less traffic.
                with train_model.no_sync() if ddp and micro < A - 1 else nullcontext():
                    with autocast:
                        _, loss = train_model(x, y)
                    (loss / A).backward()
                loss_sum += loss.detach()
            # One small all-reduce per step for what all ranks must agree on: the mean loss (to log it and
            # to stop on NaN) and whether any rank got a stop signal (so that all stop at the same step).
            shared = torch.stack([loss_sum / A, torch.tensor(float(bool(signals.received)), device=device)])
            if ddp:
                dist.all_reduce(shared)
            loss_val, stop = shared[0].item() / W, shared[1].item() > 0
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"] or float("inf")).item()
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
                raise TrainError(f"loss {loss_val} / gradient norm {grad_norm} at step {step + 1} is not finite; stopped without "
                                 f"saving, the last good checkpoint stays in {out_dir} (lower --lr or raise --warmup_steps)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            record = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt,
                      "mfu": flops_per_token * tokens_per_step / dt / (peak * W) if peak else None}
            if master and (step % cfg["log_interval"] == 0 or step == 1):
                mfu = f"{100 * record['mfu']:.1f}%" if peak else "n/a"
                print(f"step {step}/{cfg['max_steps']} | loss {loss_val:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} "
                      f"| {record['tokens_per_s']:,.0f} tok/s | MFU {mfu}")
            evaluated, stop_at = step % cfg["eval_interval"] == 0 or step == cfg["max_steps"], step == cfg["stop_at"]
            if evaluated:
                record["val_loss"] = evaluate()
                if not math.isfinite(record["val_loss"]):
                    raise TrainError(f"validation loss is {record['val_loss']} at step {step}; stopped without saving")
                is_best, best_val = record["val_loss"] < best_val, min(best_val, record["val_loss"])
                if master:
                    print(f"step {step}: val loss {record['val_loss']:.4f}{' (best so far)' if is_best else ''}")
            metrics.write(record)  # before the checkpoint: a resume drops records past the checkpoint's step
            if evaluated or stop or stop_at:
                save(record.get("val_loss"), evaluated and is_best)
            if stop or stop_at:
                why = f"--stop_at {step}" if stop_at else f"a stop signal ({', '.join(signals.received) or 'on another rank'})"
                if master:
                    print(f"stopped by {why} at step {step}; checkpoint in {out_dir / 'ckpt_latest'}; continue with --resume")
                break
    if master:
        metrics.plot(out_dir / "loss.png")
        if step == cfg["max_steps"] and cfg["sample_tokens"]:
            sample(raw_model, cfg, device)


class Metrics:
    """metrics.jsonl, one JSON record per step; resuming at step k drops records past k (work that was lost)."""

    def __init__(self, path: Path, start_step: int, master: bool):
        self.path, self.master, self.records, self.wandb = path, master, [], None
        if master and start_step > 0 and path.exists():
            self.records = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= start_step]
        if master:
            path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        if self.master:
            self.records.append(record)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb:
                self.wandb.log(record, step=record["step"])

    def plot(self, path: Path) -> None:
        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        plot.plot_curves(path, [(*zip(*c), color) for c, color in ((train, (70, 130, 220)), (val, (220, 50, 50))) if c])
        print(f"wrote {path}: train loss (blue) and validation loss (red) against steps")


def sample(raw_model, cfg: dict, device: torch.device) -> None:
    """A sample from the trained model, continuing --prompt at the start of a new document."""
    tok = tokenizer_lib.load_tokenizer(cfg["tokenizer"])
    prompt = [tokenizer_lib.EOT_ID] + tok.encode(cfg["prompt"], add_special_tokens=False).ids
    generator = torch.Generator(device).manual_seed(cfg["seed"])  # its own RNG: the sample is reproducible
    new = raw_model.generate([prompt], cfg["sample_tokens"], temperature=0.8, top_k=200, generator=generator)[0]
    print(f"sample (temperature 0.8, top-k 200):\n{tok.decode(prompt[1:] + new, skip_special_tokens=False)}")


if __name__ == "__main__":
    main()
