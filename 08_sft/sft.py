"""Supervised fine-tuning (SFT): a pretrained LilLM becomes a chat model, by full fine-tuning or LoRA.

    loss = - (1 / N) * sum over assistant tokens i of log p(x_i | x_<i),   N = assistant tokens in the global batch

The same next-token loss as pretraining, on conversations rendered with the chat template (template.py),
counted only where the assistant speaks: the model learns to answer and to end its turn with </s>, not
to imitate users. N is counted over the whole global batch (every micro-step, every rank) before the
first backward, so a token weighs the same whether its row sits in a short or a long micro-batch; the
mean of per-micro-batch means would not (the gradient-accumulation bug several trainers shipped).

Data (data.py): JSONL files of {"messages": [...]} (--data), a Hugging Face dataset (--hf_dataset), or by
default the offline instruction set (instructions.py); cut to max_seq_len by whole turns, packed into rows.

Training reuses lesson 07's pieces (device and DDP setup, AdamW with decay on matrices only, warmup and
cosine schedule, the rank-disjoint epoch sampler, atomic checkpoints and --resume, metrics.jsonl); with
--lora only the adapters of lora.py train, and a checkpoint holds only them. At the end the best model
(adapters merged) is exported for Hugging Face with the chat template, into OUT_DIR/hf.

Commands (after the pretraining main job, which writes out/ckpt_best):
    python 08_sft/sft.py --base out/ckpt_best                                  # full fine-tuning, offline set
    python 08_sft/sft.py --base out/ckpt_best --lora --lora_rank 8 --out_dir out/sft_lora
    torchrun --standalone --nproc_per_node=2 08_sft/sft.py --base out/ckpt_best
    python 08_sft/sft.py --base out/ckpt_best --data my_chats.jsonl            # your own conversations
    python 08_sft/sft.py --base out/ckpt_best --hf_dataset HuggingFaceH4/ultrachat_200k --hf_split train_sft
Left out on purpose: preference tuning (DPO/RLHF), torch.compile (07 has it; SFT runs are short), MFU.
"""

import argparse
import json
import math
import random
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
corpus = import_module("01_tokenizer.corpus")
prepare = import_module("01_tokenizer.prepare")
tokenizer_lib = import_module("01_tokenizer.tokenizer")
lillm = import_module("06_model.model")
hf = import_module("06_model.hf")
pretrain = import_module("07_pretrain_ddp.train")  # the trainer's pieces: schedule, optimizer, DDP setup, logging
checkpoint = import_module("07_pretrain_ddp.checkpoint")
windows = import_module("07_pretrain_ddp.data")  # its epoch-shuffled, rank-disjoint sampler, here over rows
template = import_module("08_sft.template")
lora = import_module("08_sft.lora")
data = import_module("08_sft.data")

# ---- evaluation ----------------------------------------------------------------------------------------

@torch.no_grad()
def assistant_loss(model, rows: list, pad_id: int, batch_size: int, device, autocast=nullcontext(),
                   rank: int = 0, world: int = 1) -> float:
    """Mean cross-entropy over every assistant token of `rows` (split across ranks, summed, then divided)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=device)  # (sum of token losses, tokens)
    mine = rows[rank::world]
    for i in range(0, len(mine), batch_size):
        x, y = (t.to(device) for t in data.collate(mine[i : i + batch_size], pad_id))
        n = (y != data.IGNORE).sum()
        with autocast:
            _, loss = model(x, y)
        total += torch.stack([loss.float() * n, n.float()])
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def answer_prompts(convs: list) -> list:
    """Each conversation cut before its last answer: (the messages that prompt it, the reference answer)."""
    out = []
    for messages in convs:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append((messages[:last], messages[last]["content"]))
    return out


def end_of_turn_rate(model, fmt, prompts: list, max_new_tokens: int) -> tuple:
    """(fraction of greedy answers that say something and then end with </s> within max_new_tokens, the
    answers' texts). An empty answer does not count: "</s>" alone is not following the format."""
    encoded = [fmt.encode(messages, add_generation_prompt=True)[0] for messages, _ in prompts]
    encoded = [ids for ids in encoded if len(ids) + max_new_tokens <= model.config.max_seq_len]
    ended, texts = 0, []
    for i in range(0, len(encoded), model.config.max_batch_size):
        for new in model.generate(encoded[i : i + model.config.max_batch_size], max_new_tokens, stop_id=fmt.eot_id):
            ended += len(new) > 1 and new[-1] == fmt.eot_id
            texts.append(fmt.tokenizer.decode(new))  # special tokens (the </s>) are not printed
    return ended / max(1, len(encoded)), texts


# ---- training ------------------------------------------------------------------------------------------

DEFAULTS = dict(
    base="out/ckpt_best", tokenizer=None, data=None, val_data=None, hf_dataset=None, hf_split="train",
    hf_limit=0, data_dir="data/sft", val_fraction=0.05, out_dir="out/sft", pack=True,
    lora=False, lora_rank=8, lora_alpha=16.0, lora_targets="wq,wk,wv,wo",
    batch_size=8, grad_accum=1, max_steps=200, lr=None, min_lr=None, warmup_steps=10, weight_decay=0.0, grad_clip=1.0,
    eval_interval=50, log_interval=10, eval_prompts=64, answer_tokens=48, seed=1337, device="auto", dtype="auto", stop_at=0,
)
SHAPE = ("base", "lora", "lora_rank", "lora_alpha", "lora_targets")  # what a resumed run may not change


def parse_args(argv=None) -> dict:
    """Only the flags given: DEFAULTS (or, with --resume, the checkpoint's config) fill in the rest."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)

    def flag(name, help, **kw):
        p.add_argument(f"--{name}", help=f"{help} [default {DEFAULTS[name]}]", **kw)

    p.add_argument("--resume", action="store_true", help="continue OUT_DIR/ckpt_latest with its saved config; flags given override it")
    flag("base", "the pretrained model: a lilLM checkpoint (07's out/ckpt_best), file, or Hugging Face Llama dir")
    flag("tokenizer", "tokenizer.json (None: beside the base, else data/tokenizer.json; checked against the base's sha256)")
    flag("data", "training conversations: JSONL files of {\"messages\": [...]} (None: the offline instruction set)", nargs="+")
    flag("val_data", "validation conversations, JSONL (None: a fixed val_fraction of --data or of the hub split)", nargs="+")
    flag("hf_dataset", "a Hugging Face dataset with a \"messages\" column, instead of --data (needs the hub)")
    flag("hf_split", "its split")
    flag("hf_limit", "read at most this many hub conversations; 0: all", type=int)
    flag("data_dir", "where the offline instruction set is written (instructions.py)")
    flag("val_fraction", "share of conversations held out when no --val_data is given (lesson 01's crc32 rule)", type=float)
    flag("out_dir", "checkpoints (ckpt_latest/, ckpt_best/), config.json, metrics.jsonl, loss.png, hf/")
    flag("pack", "pack whole conversations into rows of max_seq_len tokens (--no-pack: one per row, padded)",
         action=argparse.BooleanOptionalAction)
    flag("lora", "train LoRA adapters on a frozen base instead of every weight", action=argparse.BooleanOptionalAction)
    flag("lora_rank", "LoRA rank r", type=int)
    flag("lora_alpha", "LoRA alpha: the update is scaled by alpha / r", type=float)
    flag("lora_targets", f"comma-separated linear layers to adapt, from {','.join(lora.TARGETS)}")
    flag("batch_size", "micro-batch: rows per process per forward pass", type=int)
    flag("grad_accum", "micro-steps per optimizer step", type=int)
    flag("max_steps", "optimizer steps; the learning rate reaches min_lr at the last one", type=int)
    flag("lr", "peak learning rate (None: 3e-4 full, 1e-3 LoRA)", type=float)
    flag("min_lr", "final learning rate (None: lr / 10)", type=float)
    flag("warmup_steps", "linear warmup steps", type=int)
    flag("weight_decay", "AdamW weight decay on weight matrices", type=float)
    flag("grad_clip", "clip the gradient's global norm to this; 0: no clipping", type=float)
    flag("eval_interval", "validation loss and checkpoints every this many steps", type=int)
    flag("log_interval", "print a progress line every this many steps", type=int)
    flag("eval_prompts", "validation prompts answered greedily for the end-of-turn rate, before and after", type=int)
    flag("answer_tokens", "longest answer, in tokens, for that measurement", type=int)
    flag("seed", "seed for the row order, the adapters' initialization and dropout", type=int)
    flag("device", "auto: cuda:LOCAL_RANK if there is a GPU, else cpu", choices=["auto", "cpu", "cuda"])
    flag("dtype", "auto: bfloat16 autocast on GPU, float32 on CPU", choices=["auto", "float32", "bfloat16"])
    flag("stop_at", "save and exit at this step as on SIGTERM; 0: off", type=int)
    return vars(p.parse_args(argv))


def resolve_config(given: dict, saved: dict | None = None) -> dict:
    """Flags given > the checkpoint's config (with --resume) > DEFAULTS; one-line errors for bad values."""
    cfg = dict(DEFAULTS) if saved is None else {k: v for k, v in saved.items() if k not in ("resume", "stop_at")}
    if saved is not None:
        changed = [f"--{k} {given[k]} (checkpoint: {saved[k]})" for k in SHAPE if k in given and given[k] != saved[k]]
        if changed:
            raise pretrain.TrainError(f"--resume with a different base or adapters: {', '.join(changed)}")
    cfg.update(given)
    cfg.setdefault("resume", False)
    cfg["stop_at"] = given.get("stop_at", 0)
    cfg["lr"] = cfg["lr"] or (1e-3 if cfg["lora"] else 3e-4)  # adapters start at zero and are few: a larger step
    cfg["min_lr"] = cfg["min_lr"] or cfg["lr"] / 10
    for k in ("batch_size", "grad_accum", "max_steps", "eval_interval", "log_interval", "lora_rank", "eval_prompts", "answer_tokens"):
        if cfg[k] < 1:
            raise pretrain.TrainError(f"--{k} {cfg[k]}: must be at least 1")
    if not 0 < cfg["min_lr"] <= cfg["lr"] or not 0 <= cfg["warmup_steps"] < cfg["max_steps"]:
        raise pretrain.TrainError(f"need 0 < min_lr <= lr and 0 <= warmup_steps < max_steps, got {cfg['min_lr']}, "
                                  f"{cfg['lr']}, {cfg['warmup_steps']}, {cfg['max_steps']}")
    if cfg["data"] and cfg["hf_dataset"]:
        raise pretrain.TrainError("give --data or --hf_dataset, not both")
    return cfg


def load_conversations(cfg: dict) -> tuple:
    """(train, val) conversation lists from --data / --hf_dataset / the offline set."""
    if cfg["hf_dataset"]:
        convs = data.hub_conversations(cfg["hf_dataset"], cfg["hf_split"], cfg["hf_limit"] or None)
    elif cfg["data"]:
        convs = [c for path in cfg["data"] for c in data.read_jsonl(path)]
    else:
        train_path, val_path = data.default_data(cfg["data_dir"])
        return data.read_jsonl(train_path), data.read_jsonl(val_path)
    if cfg["val_data"]:
        return convs, [c for path in cfg["val_data"] for c in data.read_jsonl(path)]
    # Held out by lesson 01's rule on the conversation's own text: the same split on every run and rank.
    is_val = [prepare.is_val(json.dumps(c, sort_keys=True), cfg["val_fraction"]) for c in convs]
    train, val = [c for c, v in zip(convs, is_val) if not v], [c for c, v in zip(convs, is_val) if v]
    if not train or not val:
        raise data.DataError(f"{len(convs)} conversations give {len(train)} train and {len(val)} val; "
                             "fix: more conversations, another --val_fraction, or --val_data")
    return train, val


def load_base(cfg: dict, device, tokenizer_path: Path):
    """The pretrained model and its tokenizer's ChatFormat, checked to belong together."""
    model = lillm.load_model(cfg["base"], device)  # its FileNotFoundError says how to pretrain one
    fmt = template.ChatFormat(tokenizer_lib.load_tokenizer(tokenizer_path))
    state_file = Path(cfg["base"]) / checkpoint.STATE_FILE
    if state_file.is_file():  # a 07 checkpoint records which tokenizer made its token files
        expected = checkpoint.load_state(cfg["base"])["tokenizer_sha256"]
        if expected != tokenizer_lib.tokenizer_sha256(tokenizer_path):
            raise pretrain.TrainError(f"{tokenizer_path} is not the tokenizer {cfg['base']} was pretrained with "
                                      f"(sha256 {expected[:12]}); pass that one with --tokenizer")
    if fmt.tokenizer.get_vocab_size() > model.config.vocab_size:
        raise pretrain.TrainError(f"{tokenizer_path} has {fmt.tokenizer.get_vocab_size()} tokens, more than the base's {model.config.vocab_size}")
    return model, fmt


def save_checkpoint(ckpt_dir: Path, model, train_state: dict, base: str) -> None:
    """07's atomic checkpoint; with LoRA, adapter.safetensors (the adapters only) instead of model.safetensors."""
    adapters_only = (lambda d: lora.save_adapters(model, d / lora.ADAPTER_FILE, base)) if lora.lora_modules(model) else None
    checkpoint.save(ckpt_dir, model, train_state, write_weights=adapters_only)


def load_trained(cfg: dict, ckpt_dir: Path, device, base=None):
    """The model of an SFT checkpoint: its weights, or the base (loaded unless given) with its adapters, unmerged."""
    path = checkpoint.find(ckpt_dir)
    if path is None:
        raise checkpoint.CheckpointError(f"no checkpoint at {ckpt_dir}; start a new run without --resume")
    if not cfg["lora"]:
        return checkpoint.load_model(path, device)
    return lora.load_adapters(base if base is not None else lillm.load_model(cfg["base"], device), path)


def main(argv=None) -> dict:
    given = parse_args(argv)
    cfg, state = resolve_config(given), None
    out_dir = Path(cfg["out_dir"])
    if given.get("resume"):
        state = checkpoint.load_state(out_dir / "ckpt_latest")
        cfg = resolve_config(given, state["config"])
    elif checkpoint.find(out_dir / "ckpt_latest") or checkpoint.find(out_dir / "ckpt_best"):
        raise pretrain.TrainError(f"{out_dir} already holds a checkpoint: pass --resume to continue it, or another --out_dir")
    ddp, rank, local_rank, world, device = pretrain.setup_distributed(cfg["device"])
    try:
        return train(cfg, state, ddp, rank, world, device)
    finally:
        if ddp:
            dist.destroy_process_group()


def train(cfg: dict, state: dict | None, ddp: bool, rank: int, world: int, device) -> dict:
    master, out_dir = rank == 0, Path(cfg["out_dir"])
    tokenizer_path = template.find_tokenizer(cfg["base"], cfg["tokenizer"])
    model, fmt = load_base(cfg, device, tokenizer_path)
    max_len = model.config.max_seq_len
    # The offline instruction set is built once, by rank 0, before the others read it.
    pretrain.build_then_barrier(lambda: data.default_data(cfg["data_dir"]),
                                master and not cfg["data"] and not cfg["hf_dataset"], ddp)
    train_convs, val_convs = load_conversations(cfg)
    examples, counts = data.encode_all(fmt, train_convs, max_len)
    val_examples, _ = data.encode_all(fmt, val_convs, max_len)
    # Rows are packed once, from a seeded shuffle; 07's sampler then reads them in a fresh order every epoch.
    random.Random(cfg["seed"]).shuffle(examples)
    rows = data.pack(examples, max_len) if cfg["pack"] else examples
    val_rows = data.pack(val_examples, max_len) if cfg["pack"] else val_examples
    B, A = cfg["batch_size"], cfg["grad_accum"]
    if len(rows) < B * A * world or not val_rows:
        raise data.DataError(f"{len(rows)} train rows and {len(val_rows)} val rows: fewer than one global batch of "
                             f"{B * A * world} rows, or no validation; fix: more conversations or a smaller --batch_size")
    dtype = cfg["dtype"] if cfg["dtype"] != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()

    torch.manual_seed(cfg["seed"])  # the same adapters' initialization on every rank
    if state is not None:
        model = load_trained(cfg, out_dir / "ckpt_latest", device, model)
    elif cfg["lora"]:
        lora.apply_lora(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_targets"].split(","))
    torch.manual_seed(cfg["seed"] + rank)  # different dropout masks per rank
    # 07's optimizer over every parameter: frozen ones never get a .grad, and AdamW skips those entirely.
    optimizer = pretrain.make_optimizer(model, cfg["lr"], cfg["weight_decay"], device)
    step, best_val, position = 0, float("inf"), 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, best_val, position = state["step"], state["best_val_loss"], state["data_position"]
        if len(state["rng"]) == world:
            checkpoint.set_rng_state(state["rng"][rank])
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
    sampler = windows.RankSampler(windows.WindowStream(len(rows), cfg["seed"]), B, rank, world, position)
    prompts = answer_prompts(val_convs[: cfg["eval_prompts"]])
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if master:
        print(f"config: {json.dumps(cfg, sort_keys=True)}\ngit revision: {pretrain.git_revision()}")
        print(f"base {cfg['base']}: {model.num_params():,} parameters, {n_train:,} trained ({'LoRA' if cfg['lora'] else 'full'}), "
              f"on {device} ({dtype}), {world} process(es)")
        print(f"conversations: {len(train_convs):,} train ({counts['kept']:,} kept, {counts['truncated']:,} truncated by whole "
              f"turns, {counts['dropped']:,} dropped: longer than {max_len} tokens), {len(val_convs):,} val")
        print(f"rows of <= {max_len} tokens: {len(rows):,} train, {len(val_rows):,} val; global batch = {B} rows x {A} "
              f"micro-steps x {world} processes; one epoch = {len(rows) / (B * A * world):.1f} steps")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dict(cfg, git_revision=pretrain.git_revision(), world_size=world), indent=2))
    metrics = pretrain.Metrics(out_dir / "metrics.jsonl", step, master)

    def evaluate() -> float:
        return assistant_loss(model, val_rows, fmt.eot_id, B, device, autocast, rank, world)

    before = state["before"] if state is not None else None
    if before is None:
        before = {"val_loss": evaluate()}
        if master:
            before["eot_rate"], answers = end_of_turn_rate(model, fmt, prompts, cfg["answer_tokens"])
            print(f"base model: assistant-token val loss {before['val_loss']:.4f}, answers ending with </s>: "
                  f"{100 * before['eot_rate']:.0f}% of {len(prompts)}; e.g. {(answers or [''])[0][:80]!r}")
        metrics.write({"step": 0, "val_loss": before["val_loss"]})

    def save(val_loss):
        rngs = [None] * world
        if ddp:
            dist.all_gather_object(rngs, checkpoint.rng_state())
        else:
            rngs = [checkpoint.rng_state()]
        if master:
            ts = {"step": step, "optimizer": optimizer.state_dict(), "rng": rngs, "data_position": sampler.position,
                  "config": cfg, "tokenizer_sha256": tokenizer_lib.tokenizer_sha256(tokenizer_path),
                  "best_val_loss": best_val, "val_loss": val_loss, "before": before}
            save_checkpoint(out_dir / "ckpt_latest", model, ts, cfg["base"])
            if val_loss is not None and val_loss <= best_val:
                save_checkpoint(out_dir / "ckpt_best", model, ts, cfg["base"])

    with checkpoint.StopOnSignal() as signals:  # SIGTERM/SIGINT: save and stop at a step boundary
        while step < cfg["max_steps"]:
            t0 = time.perf_counter()
            lr = pretrain.lr_at(step, cfg["lr"], cfg["min_lr"], cfg["warmup_steps"], cfg["max_steps"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [data.collate([rows[i] for i in sampler.next_ids()], fmt.eot_id) for _ in range(A)]
            # N: the assistant tokens of the whole global batch, known before any backward, so each token's
            # loss gets weight 1 / N wherever it sits. DDP averages gradients over ranks, hence the x world.
            counts_here = torch.tensor([float((y != data.IGNORE).sum()) for _, y in micro], device=device)
            assert counts_here.min() > 0, "every row holds an assistant answer, so every micro-batch has targets"
            n_global = counts_here.sum()
            if ddp:
                dist.all_reduce(n_global)
            loss_sum = torch.zeros((), device=device)
            for k, (x, y) in enumerate(micro):
                with train_model.no_sync() if ddp and k < A - 1 else nullcontext():
                    with autocast:
                        _, loss = train_model(x.to(device), y.to(device))
                    (loss * counts_here[k] * world / n_global).backward()
                loss_sum += loss.detach() * counts_here[k]
            shared = torch.stack([loss_sum, torch.tensor(float(bool(signals.received)), device=device)])
            if ddp:
                dist.all_reduce(shared)
            loss_val, stop = (shared[0] / n_global).item(), shared[1].item() > 0
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                       cfg["grad_clip"] or float("inf")).item()
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
                raise pretrain.TrainError(f"loss {loss_val} / gradient norm {grad_norm} at step {step + 1} is not finite; "
                                          f"the last good checkpoint is in {out_dir} (lower --lr)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens = sum(x.numel() for x, _ in micro) * world
            record = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens / (time.perf_counter() - t0)}
            if master and (step % cfg["log_interval"] == 0 or step == 1):
                print(f"step {step}/{cfg['max_steps']} | assistant loss {loss_val:.4f} | lr {lr:.2e} | "
                      f"grad norm {grad_norm:.3f} | {record['tokens_per_s']:,.0f} tok/s")
            stop_at = step == cfg["stop_at"]
            evaluated = step % cfg["eval_interval"] == 0 or step == cfg["max_steps"]
            if evaluated:
                record["val_loss"] = evaluate()
                is_best = record["val_loss"] < best_val
                best_val = min(best_val, record["val_loss"])
                if master:
                    print(f"step {step}: assistant-token val loss {record['val_loss']:.4f}{' (best)' if is_best else ''}")
            metrics.write(record)  # before the checkpoint, as in 07: a resume drops records past its step
            if evaluated:
                save(record["val_loss"] if is_best else None)
            elif stop or stop_at:
                save(None)
            if stop or stop_at:
                if master:
                    print(f"stopped at step {step}; checkpoint in {out_dir / 'ckpt_latest'}; continue with --resume")
                return {"step": step, "before": before}
    summary = {"step": step, "before": before, "after": {"val_loss": best_val}, "counts": counts}
    if master:
        metrics.plot(out_dir / "loss.png")
        best = lora.merge_lora(load_trained(cfg, out_dir / "ckpt_best", device))  # merged: a plain LilLM again
        summary["after"]["eot_rate"], answers = end_of_turn_rate(best, fmt, prompts, cfg["answer_tokens"])
        # with the chat template in tokenizer_config.json: apply_chat_template speaks the format it was tuned on
        hf.export_hf(best, tokenizer_path, out_dir / "hf", chat_template=template.CHAT_TEMPLATE)
        print(f"assistant-token val loss: base {before['val_loss']:.4f} -> fine-tuned {best_val:.4f}")
        print(f"answers ending with </s> within {cfg['answer_tokens']} tokens: base {100 * before['eot_rate']:.0f}% -> "
              f"fine-tuned {100 * summary['after']['eot_rate']:.0f}% of {len(prompts)} validation prompts")
        for (messages, reference), answer in list(zip(prompts, answers))[:3]:
            print(f"  {messages[-1]['content']!r} -> {answer!r} (reference {reference!r})")
        print(f"chat with it: python 08_sft/chat.py --checkpoint {out_dir / 'ckpt_best'}   "
              f"(Hugging Face export with the chat template: {out_dir / 'hf'})")
    return summary


def cli(argv=None) -> None:
    """main() with bad input turned into one line on stderr and exit code 2, as in lesson 07."""
    try:
        main(argv)
    except (pretrain.TrainError, data.DataError, checkpoint.CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
