"""Pretraining LilLM with DistributedDataParallel: one file from one CPU process to many GPU nodes.

    each rank:  its own micro-batches (disjoint windows), loss = summed cross-entropy / N
    backward:   g = sum_r grad loss_r          N = target tokens in the whole global batch; DDP all-reduces
    update:     g clipped to norm 1; Muon (muon.py) for the blocks' matrices, AdamW for the rest (--optimizer adamw:
                AdamW for all); lr = warmup, then cosine to min_lr at max_steps

Every rank holds the whole model and optimizer and sees other data; DDP averages the gradients so every
rank takes the same step (notes.md). The global batch is batch_size x max_seq_len x grad_accum x world_size
tokens. `fit` and `train_step` are every stage's: SFT, DPO, GRPO (08, 10, 11) bring data and an objective.

    python 07_pretrain_ddp/train.py                            # CPU preset, 8-15 min on 2 cores, fresh clone
    torchrun --standalone --nproc_per_node=8 07_pretrain_ddp/train.py --preset full  # 8 GPUs (grad_accum 4)
    python 07_pretrain_ddp/train.py --resume                   # continue out/ckpt_latest exactly
    python 07_pretrain_ddp/train.py --preset full --dry_run    # the full recipe's code path, tiny, in a minute
Beside it: stage.py (flags, presets, processes), data.py (token windows), checkpoint.py, metrics.py. Left out on purpose: FSDP/tensor parallelism, fp16 with loss scaling, document masking, a data-loader process.
"""

import math
import sys
from contextlib import nullcontext
from importlib import import_module
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
tokenizer_lib = import_module("01_tokenizer.tokenizer")
lillm = import_module("06_model.model")
stage = import_module("07_pretrain_ddp.stage")
data = import_module("07_pretrain_ddp.data")
checkpoint = import_module("07_pretrain_ddp.checkpoint")
metrics = import_module("07_pretrain_ddp.metrics")
muon = import_module("07_pretrain_ddp.muon")
IGNORE = -100  # the target of a position that is not trained on (the model's ignore_index)


class TokenCrossEntropy:
    """What a step minimizes: the units of a micro-batch (its target tokens), and its summed loss and other figures
    ({name: tensor}, logged per unit) over them. Lesson 10 brings pairs and the DPO loss, 11 the clipped surrogate."""

    def count(self, batch) -> torch.Tensor:
        return (batch[1] != IGNORE).sum()

    def loss_sum(self, model, batch) -> tuple:
        _, loss = model(*batch)  # the mean over the micro-batch's targets
        return loss * self.count(batch), {}


def fit(model, train_model, optimizer, next_micro_batches, validate, cfg: dict, run, log: metrics.Metrics,
        start: tuple, train_state: dict, autocast=nullcontext(), flops_per_token: float = 0.0, peak: float = 0.0,
        write_weights=None, objective=TokenCrossEntropy()) -> dict:
    """The loop: schedule, step, log, evaluate, checkpoint, stop. validate() -> {"val_loss": ..., other figures},
    the same on every rank; ckpt_best is the lowest val_loss. Values stay on the device between log steps."""
    out_dir, (step, best_val, sampler) = Path(cfg["out_dir"]), start
    window = metrics.LogWindow(run, flops_per_token, peak, out_dir)
    with checkpoint.StopOnSignal() as signals:
        if step == 0:
            log.write({"step": 0, **validate()})
        window.restart()  # after step 0's evaluation: the first window times training only
        while step < cfg["max_steps"]:
            lr = lr_at(step, cfg["lr"], cfg["min_lr"], cfg["warmup_steps"], cfg["max_steps"])
            for group in optimizer.param_groups:  # Muon's group: the same schedule at its own scale
                group["lr"] = lr * group.get("lr_scale", 1.0)
            batches = next_micro_batches()
            window.add(lr, train_step(model, train_model, optimizer, batches, run, cfg["grad_clip"], autocast, objective),
                       sum(batch[0].numel() for batch in batches) * run.world)  # input tokens of the global batch
            step += 1
            evaluated, stop_at = step % cfg["eval_interval"] == 0 or step == cfg["max_steps"], step == cfg["stop_at"]
            if not (evaluated or stop_at or step % cfg["log_interval"] == 0 or step == 1):
                continue
            (*done, record), stop = window.read(step, bool(signals.received))  # one all-reduce, one read
            for r in done:
                log.write(r)
            if step % cfg["log_interval"] == 0 or step == 1:
                log.progress(record, cfg["max_steps"])
            if evaluated:
                record.update(validate())
                if not math.isfinite(record["val_loss"]):
                    raise stage.TrainError(f"validation loss is {record['val_loss']} at step {step}; stopped without saving")
                is_best, best_val = record["val_loss"] < best_val, min(best_val, record["val_loss"])
                log.validation(record, is_best)
            log.write(record)  # before the checkpoint: a resume drops records past the checkpoint's step
            if evaluated or stop or stop_at:
                state = dict(train_state, step=step, optimizer=optimizer.state_dict(), data_position=sampler.position,
                             config=cfg, best_val_loss=best_val, val_loss=record.get("val_loss"))
                checkpoint.save_run(out_dir, model, state, run, evaluated and is_best, write_weights)
            window.restart()
            if stop or stop_at:
                why = f"--stop_at {step}" if stop_at else f"a stop signal ({', '.join(signals.received) or 'on another rank'})"
                log.say(f"stopped by {why} at step {step}; checkpoint in {out_dir / 'ckpt_latest'}; continue with --resume")
                break
    log.plot(out_dir / "loss.png")
    return {"step": step, "best_val_loss": best_val, "finished": step == cfg["max_steps"]}


def train_step(model, train_model, optimizer, micro_batches, run, grad_clip: float, autocast,
               objective=TokenCrossEntropy()) -> tuple:
    """One optimizer step over this rank's micro-batches [(inputs, targets, ...)]: (this rank's summed loss, the
    global unit count N, the gradient norm, the objective's summed figures), left on the device. Each unit's loss
    is divided by N, the units of the WHOLE global batch, counted before any backward: a token weighs the same in
    any micro-batch or rank (a mean per micro-batch would not, in SFT). DDP averages over ranks: hence world."""
    n_global = torch.stack([objective.count(batch) for batch in micro_batches]).float().sum()  # on the device
    if run.ddp:
        dist.all_reduce(n_global)
    loss_sum, figures = torch.zeros((), device=run.device), {}
    for k, batch in enumerate(micro_batches):
        # Skip DDP's gradient all-reduce on all micro-steps but the last: they add into the same
        # .grad, so one all-reduce of the sum gives the same average with A times less traffic.
        with train_model.no_sync() if run.ddp and k < len(micro_batches) - 1 else nullcontext():
            with autocast:
                summed, extra = objective.loss_sum(train_model, batch)  # summed over this micro-batch's units
            (summed * run.world / n_global).backward()
        loss_sum += summed.detach()
        for name, value in extra.items():
            figures[name] = figures.get(name, 0) + value.detach().float()
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_global, grad_norm, figures


@torch.no_grad()
def loss_sums(model, batches, token_bytes: torch.Tensor, autocast=None) -> torch.Tensor:
    """(3,) float64: summed target nats, bytes and tokens over (x, y) batches, for ranks to all-reduce before one division:
    loss = nats / tokens; bits per byte = nats / (ln 2 bytes), comparable across tokenizers (lesson 09's notes)."""
    device = next(model.parameters()).device  # model may be wrapped (DDP, torch.compile)
    token_bytes, total = token_bytes.to(device), torch.zeros(3, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for x, y in batches:
        with autocast or nullcontext():
            logits, _ = model(x)  # (B, T, V)
        keep = y != IGNORE  # (B, T)
        # float32 log-softmax: bf16 logits lose precision over thousands of classes
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="none")  # (B*T,)
        total += torch.stack([nats.double().sum(), token_bytes[y.clamp(min=0)][keep].double().sum(), keep.sum().double()])
    model.train(was_training)
    return total


def evaluate(model, batches, run, autocast, token_bytes) -> dict:
    """Mean cross-entropy per target token and bits per byte, over this rank's batches and the other ranks'."""
    total = loss_sums(model, batches, token_bytes, autocast)
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


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device, optimizer: str = "adamw", muon_lr=None):
    """AdamW, decay on the matrices of attention and FFN only: norm gains sit near 1, and a rare token's embedding
    row would shrink at every step but get a gradient only when the token occurs (Llama recipes; nanoGPT decays it).
    "muon": those matrices go to Muon (muon.py) at muon_lr (None: lr), the rest stays on AdamW."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # the tied matrix appears once, as tok_embeddings.weight
        (decay if p.dim() == 2 and "tok_embeddings" not in name else no_decay).append(p)
    groups, fused = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], device.type in ("cuda", "cpu")
    adamw = lambda groups: torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)  # noqa: E731  fused: one kernel
    return adamw(groups) if optimizer == "adamw" else muon.with_adamw(model, groups, adamw, lr, muon_lr or lr)


def wrap_ddp(model, run):
    """DDP: rank 0's weights to all, then each bucket of gradients all-reduced as soon as backward has made it. The one
    buffer, the RoPE table, is alike on every rank: no broadcast of it before every forward."""
    return DDP(model, device_ids=[run.local_rank] if run.device.type == "cuda" else None, forward_sync_buffers=False) if run.ddp else model


def pretrain(cfg: dict, state: dict | None, run) -> dict:
    B, T, W, A = cfg["batch_size"], cfg["max_seq_len"], run.world, stage.set_grad_accum(cfg, run.world)
    dtype, autocast = stage.precision(cfg, run.device)
    meta = data.load_data(cfg)
    model_cfg = stage.model_config(cfg, meta["vocab_size"])
    train_data, val_data = data.token_windows(cfg["data_dir"], meta, T)
    torch.manual_seed(cfg["seed"] + run.rank)  # each rank its own init: DDP copies rank 0's weights anyway
    model = stage.start_model(cfg, state, run, lillm.LilLM(model_cfg).to(run.device))  # resuming: the checkpoint's
    if state is not None:
        checkpoint.check_resume(state, model_cfg, model.config, meta["tokenizer_sha256"], cfg["data_dir"])
    optimizer = make_optimizer(model, cfg["lr"], cfg["weight_decay"], run.device, cfg["optimizer"], cfg["muon_lr"])
    step, best_val, position = checkpoint.restore(state, optimizer, run)
    train_model = wrap_ddp(torch.compile(model) if cfg["compile"] else model, run)
    sampler = data.RankSampler(data.WindowStream(train_data.n_windows, cfg["seed"]), B, run.rank, W, position)
    val_batches = data.eval_batches(val_data, cfg["eval_tokens"], B, run)
    peak = metrics.peak_flops(run, dtype, cfg["peak_tflops"])
    stage.describe_run(cfg, run, model, [
        f"global batch = {B} windows x {T} tokens x {A} micro-steps x {W} processes = {B * T * A * W:,} tokens per step",
        f"{model.num_params():,} parameters, vocab {model_cfg.vocab_size:,}, on {run.device} in {dtype}, {W} process(es); "
        f"train.bin holds {train_data.n_windows:,} windows: one epoch = {train_data.n_windows / (B * A * W):,.1f} steps"])
    log = metrics.Metrics(Path(cfg["out_dir"]) / "metrics.jsonl", step, run.master, cfg if cfg["wandb"] else None)
    token_bytes = tokenizer_lib.token_byte_lengths(tokenizer_lib.load_tokenizer(cfg["tokenizer"]), model_cfg.vocab_size)
    result = fit(model, train_model, optimizer, lambda: [train_data.batch(sampler.next_ids(), run.device) for _ in range(A)],
                 lambda: evaluate(train_model, val_batches, run, autocast, token_bytes), cfg, run, log,
                 (step, best_val, sampler), {"tokenizer_sha256": meta["tokenizer_sha256"]}, autocast,
                 model.flops_per_token(T), peak)
    if run.master and result["finished"] and cfg["sample_tokens"]:
        print(f"sample (temperature 0.8, top-k 200):\n{metrics.sample(model, cfg['tokenizer'], cfg['prompt'], cfg['sample_tokens'], cfg['seed'], run.device)}")
    return result


def main(argv=None) -> dict:  # flags -> config -> train; bad input: one line on stderr, exit code 2
    return stage.main(stage.pretrain_flags(argv), stage.pretrain_config, data.build_token_files, pretrain)


if __name__ == "__main__":
    main()
