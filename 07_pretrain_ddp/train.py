"""Pretraining LilLM with DistributedDataParallel: one file from one CPU process to many GPU nodes.

    each rank:  its own micro-batches (disjoint windows), loss = summed cross-entropy / N
    backward:   g = sum_r grad loss_r          N = target tokens in the whole global batch; DDP all-reduces
    update:     AdamW(g clipped to norm 1), lr = warmup, then cosine to min_lr at max_steps

Every rank holds the whole model and optimizer and sees other data; DDP averages the gradients so
every rank takes the same step (notes.md: what is all-reduced when, and torchrun's rendezvous).
The global batch is batch_size x max_seq_len x grad_accum x world_size tokens. The step and the loop
below are shared with lesson 08 (SFT): a stage brings its data and its model, not a copy of the loop.

Commands (from the repository root; README.md has the full recipe, multi-node included):
    python 07_pretrain_ddp/train.py                            # CPU preset, ~10 min on 2 cores, fresh clone
    torchrun --standalone --nproc_per_node=8 07_pretrain_ddp/train.py --preset full  # 8 GPUs (grad_accum 4)
    python 07_pretrain_ddp/train.py --resume                   # continue out/ckpt_latest exactly
    python 07_pretrain_ddp/train.py --preset full --dry_run    # the full recipe's code path, tiny, in a minute
Plumbing sits beside this file: config.py (presets, flags), data.py (token windows, process setup),
checkpoint.py (atomic saves, resume), metrics.py (metrics.jsonl, the plot, MFU, the final sample).
Left out on purpose: FSDP/tensor parallelism (the model fits one GPU), fp16 with loss scaling,
document masking, a data-loader process (reading a memmap costs microseconds per window).
"""

import math
import sys
import time
from contextlib import nullcontext
from importlib import import_module
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
tokenizer_lib = import_module("01_tokenizer.tokenizer")
lillm = import_module("06_model.model")
config = import_module("07_pretrain_ddp.config")
data = import_module("07_pretrain_ddp.data")
checkpoint = import_module("07_pretrain_ddp.checkpoint")
metrics = import_module("07_pretrain_ddp.metrics")
bpb = import_module("09_eval.bpb")  # lesson 09's bits per byte: the one later lesson the trainer reports with
IGNORE = -100  # the target of a position that is not trained on (the model's ignore_index)


class TokenCrossEntropy:
    """What a step minimizes, as train_step asks for it: how many units a micro-batch (inputs, targets) holds
    (here its target tokens), counted before any backward, and its summed loss over them, with any other
    figures summed over the same units ({name: tensor}, logged as means per unit). Later stages bring their
    own (lesson 10: pairs and the DPO loss; lesson 11: completion tokens and the clipped surrogate)."""

    def count(self, batch) -> torch.Tensor:
        return (batch[1] != IGNORE).sum()

    def loss_sum(self, model, batch) -> tuple:
        _, loss = model(*batch)  # the mean over the micro-batch's targets
        return loss * self.count(batch), {}


def fit(model, train_model, optimizer, next_micro_batches, validate, cfg: dict, run, log: metrics.Metrics,
        start: tuple, train_state: dict, autocast=nullcontext(), flops_per_token: float = 0.0, peak: float = 0.0,
        write_weights=None, objective=TokenCrossEntropy()) -> dict:
    """The loop: steps, evaluations, checkpoints, stop signals. Values stay on the device between log steps
    (every log_interval steps and at evaluations), so a GPU never waits for the host inside a step.
    validate() -> {"val_loss": ..., other figures}: the same on every rank; ckpt_best is the lowest val_loss."""
    out_dir, (step, best_val, sampler) = Path(cfg["out_dir"]), start
    pending = []  # this log window's (lr, loss_sum, n, grad_norm, figures, tokens) per step
    with checkpoint.StopOnSignal() as signals:
        if step == 0:
            log.write({"step": 0, **validate()})
        t0 = time.perf_counter()  # after step 0's evaluation: the first window times training only
        while step < cfg["max_steps"]:
            lr = lr_at(step, cfg["lr"], cfg["min_lr"], cfg["warmup_steps"], cfg["max_steps"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = next_micro_batches()
            pending.append((lr, *train_step(model, train_model, optimizer, micro_batches, run, cfg["grad_clip"], autocast, objective),
                            sum(batch[0].numel() for batch in micro_batches) * run.world))  # input tokens
            step += 1
            evaluated, stop_at = step % cfg["eval_interval"] == 0 or step == cfg["max_steps"], step == cfg["stop_at"]
            if not (evaluated or stop_at or step % cfg["log_interval"] == 0 or step == 1):
                continue
            # A log step: one all-reduce sums the window's losses over ranks and tells whether any rank got a
            # stop signal (so that all stop at the same step); one read brings the values to the host.
            names = list(pending[0][4])  # the objective's own figures, summed like the loss
            sums = [torch.stack([p[1], *p[4].values()]) for p in pending]  # per step (1 + figures,)
            shared = torch.cat(sums + [torch.tensor([float(bool(signals.received))], device=run.device)])
            if run.ddp:
                dist.all_reduce(shared)
            n = len(pending)  # the gradient norms are alike on every rank: read, not reduced
            means = shared[:-1].view(n, -1) / torch.stack([p[2] for p in pending])[:, None]  # per unit (token, pair)
            values = torch.cat([means.flatten(), torch.stack([p[3] for p in pending]), shared[-1:]]).tolist()
            per_step, norms, stop = values[: means.numel()], values[means.numel() : -1], values[-1] > 0
            rows = [per_step[k : k + len(names) + 1] for k in range(0, len(per_step), len(names) + 1)]  # (loss, *figures)
            *done, record = metrics.window_records(pending, [r[0] for r in rows], norms, step, time.perf_counter() - t0,
                                                   flops_per_token, peak, run.world)
            for r, row in zip((*done, record), rows):
                r.update(zip(names, row[1:]))
            for r in (*done, record):
                if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])):
                    raise config.TrainError(f"loss {r['loss']} / gradient norm {r['grad_norm']} at step {r['step']} is not finite; stopped "
                                            f"without saving, the last good checkpoint stays in {out_dir} (lower --lr or raise --warmup_steps)")
            for r in done:
                log.write(r)
            if step % cfg["log_interval"] == 0 or step == 1:
                log.progress(record, cfg["max_steps"])
            if evaluated:
                record.update(validate())
                if not math.isfinite(record["val_loss"]):
                    raise config.TrainError(f"validation loss is {record['val_loss']} at step {step}; stopped without saving")
                is_best, best_val = record["val_loss"] < best_val, min(best_val, record["val_loss"])
                if run.master:
                    figures = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_"))
                    print(f"step {step}: {figures}{' (best so far)' if is_best else ''}")
            log.write(record)  # before the checkpoint: a resume drops records past the checkpoint's step
            if evaluated or stop or stop_at:
                state = dict(train_state, step=step, optimizer=optimizer.state_dict(), data_position=sampler.position,
                             config=cfg, best_val_loss=best_val, val_loss=record.get("val_loss"))
                checkpoint.save_run(out_dir, model, state, run, evaluated and is_best, write_weights)
            pending, t0 = [], time.perf_counter()
            if stop or stop_at:
                why = f"--stop_at {step}" if stop_at else f"a stop signal ({', '.join(signals.received) or 'on another rank'})"
                if run.master:
                    print(f"stopped by {why} at step {step}; checkpoint in {out_dir / 'ckpt_latest'}; continue with --resume")
                break
    if run.master:
        log.plot(out_dir / "loss.png")
    return {"step": step, "best_val_loss": best_val, "finished": step == cfg["max_steps"]}


def train_step(model, train_model, optimizer, micro_batches, run, grad_clip: float, autocast,
               objective=TokenCrossEntropy()) -> tuple:
    """One optimizer step over this rank's micro-batches [(inputs, targets, ...)]; returns this rank's summed
    loss, the global target count N, the gradient norm and the objective's summed figures, left on the device.

    Each target token's loss is divided by N, the target tokens of the WHOLE global batch, counted before
    any backward: a token weighs the same whichever micro-batch or rank holds it. (Averaging per micro-batch
    would not, where rows hold different numbers of targets, as in SFT; in pretraining every micro-batch
    holds B x T targets and both agree.) DDP averages over ranks, hence the factor world_size."""
    counts = torch.stack([objective.count(batch) for batch in micro_batches]).float()  # (A,) on the device
    n_global = counts.sum()
    if run.ddp:
        dist.all_reduce(n_global)
    loss_sum, figures = torch.zeros((), device=run.device), {}
    for k, batch in enumerate(micro_batches):
        # Skip DDP's gradient all-reduce on all micro-steps but the last: they add into the same
        # .grad, so one all-reduce of the sum gives the same average with A times less traffic.
        with train_model.no_sync() if run.ddp and k < len(micro_batches) - 1 else nullcontext():
            with autocast:
                summed, extra = objective.loss_sum(train_model, batch)  # over this micro-batch's counts[k] units
            (summed * run.world / n_global).backward()
        loss_sum += summed.detach()
        for name, value in extra.items():
            figures[name] = figures.get(name, 0) + value.detach().float()
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_global, grad_norm, figures


def evaluate(model, batches, run, autocast, token_bytes) -> dict:
    """Mean cross-entropy per target token and bits per byte, over this rank's batches and the other ranks'.
    token_bytes (vocab,): the bytes each token id spells."""
    total = bpb.loss_sums(model, batches, token_bytes, autocast)  # (summed nats, bytes, tokens)
    if run.ddp:
        dist.all_reduce(total)  # sums over ranks, then one division: every rank gets the same mean
    nats, n_bytes, tokens = total.tolist()
    return {"val_loss": nats / tokens, "val_bpb": nats / (math.log(2) * n_bytes) if n_bytes else float("nan")}


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
    Frozen parameters (LoRA's base) never get a .grad, and AdamW skips them.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # the tied matrix appears once, as tok_embeddings.weight
        (decay if p.dim() == 2 and "tok_embeddings" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters instead of a loop of small ops (PyTorch has it for CUDA and CPU)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type in ("cuda", "cpu"))


def wrap_ddp(model, run):
    """DDP broadcasts rank 0's weights at construction and registers hooks that all-reduce each bucket of
    gradients as soon as backward has produced it, overlapping communication with computation. The one
    buffer, the RoPE table, is alike on every rank: broadcasting it before every forward would be waste."""
    return DDP(model, device_ids=[run.local_rank] if run.device.type == "cuda" else None, forward_sync_buffers=False) if run.ddp else model


def pretrain(cfg: dict, state: dict | None, run) -> dict:
    B, T, W, A = cfg["batch_size"], cfg["max_seq_len"], run.world, config.set_grad_accum(cfg, run.world)
    dtype, autocast = config.precision(cfg, run.device)
    meta = data.load_data(cfg)
    model_cfg = config.model_config(cfg, meta["vocab_size"])
    train_data, val_data = data.token_windows(cfg["data_dir"], meta, T)
    torch.manual_seed(cfg["seed"] + run.rank)  # different dropout masks per rank; DDP copies rank 0's weights anyway
    model = lillm.LilLM(model_cfg).to(run.device)
    if state is not None:  # the rank whose disk holds the checkpoint loads it and sends its weights to all
        if run.rank == state["source_rank"]:
            model = checkpoint.load_model(Path(cfg["out_dir"]) / "ckpt_latest", run.device)
        checkpoint.check_resume(state, model_cfg, model.config, meta["tokenizer_sha256"], cfg["data_dir"])
        checkpoint.broadcast_weights(model, state["source_rank"], run)
    optimizer = make_optimizer(model, cfg["lr"], cfg["weight_decay"], run.device)
    step, best_val, position = (0, float("inf"), 0) if state is None else checkpoint.restore(state, optimizer, run)
    if run.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # float32 matmuls outside autocast may use TF32 tensor cores
    train_model = wrap_ddp(torch.compile(model) if cfg["compile"] else model, run)
    sampler = data.RankSampler(data.WindowStream(train_data.n_windows, cfg["seed"]), B, run.rank, W, position)
    val_batches = data.eval_batches(val_data, cfg["eval_tokens"], B, run)
    if run.ddp:
        dist.barrier()  # measure a CPU's peak while all processes run, as they will while training
    peak = metrics.peak_flops(run.device, dtype, cfg["peak_tflops"])
    metrics.describe_run(cfg, run, model, [
        f"global batch = {B} windows x {T} tokens x {A} micro-steps x {W} processes = {B * T * A * W:,} tokens per step",
        f"{model.num_params():,} parameters, vocab {model_cfg.vocab_size:,}, on {run.device} in {dtype}, {W} process(es); "
        f"train.bin holds {train_data.n_windows:,} windows: one epoch = {train_data.n_windows / (B * A * W):,.1f} steps"])
    log = metrics.Metrics(Path(cfg["out_dir"]) / "metrics.jsonl", step, run.master, cfg if cfg["wandb"] else None)
    token_bytes = bpb.token_byte_lengths(tokenizer_lib.load_tokenizer(cfg["tokenizer"]), model_cfg.vocab_size)
    result = fit(model, train_model, optimizer, lambda: [train_data.batch(sampler.next_ids(), run.device) for _ in range(A)],
                 lambda: evaluate(train_model, val_batches, run, autocast, token_bytes), cfg, run, log, (step, best_val, sampler), {"tokenizer_sha256": meta["tokenizer_sha256"]},
                 autocast, model.flops_per_token(T), peak)
    if run.master and result["finished"] and cfg["sample_tokens"]:
        print(f"sample (temperature 0.8, top-k 200):\n{metrics.sample(model, cfg['tokenizer'], cfg['prompt'], cfg['sample_tokens'], cfg['seed'], run.device)}")
    if run.master and result["finished"] and cfg["final_eval"]:  # lesson 09's table: what the model can do
        import_module("09_eval.eval").run_eval(Path(cfg["out_dir"]) / "ckpt_best", cfg["tokenizer"], data_dir=cfg["data_dir"],
                                               device=str(run.device))
    return result


def main(argv=None) -> None:
    """Flags -> config -> train; bad input becomes one line on stderr (`error: ...`) and exit code 2."""
    with config.one_line_errors():
        config.launch(config.parse_args(argv), config.resolve_config, data.build_token_files, pretrain)


if __name__ == "__main__":
    main()
