"""Supervised fine-tuning (SFT): a pretrained LilLM becomes a chat model, by full fine-tuning or LoRA.

    loss = - (1 / N) * sum over assistant tokens i of log p(x_i | x_<i),   N = assistant tokens in the global batch

The same next-token loss as pretraining, on conversations rendered with the chat template (template.py),
counted only where the assistant speaks: the model learns to answer and to end its turn with </s>, not
to imitate users. Lesson 07's train_step divides by N, counted over the whole global batch before the
first backward, so a token weighs the same whether its row sits in a short or a long micro-batch; the
mean of per-micro-batch means would not (the gradient-accumulation bug several trainers shipped).

This stage brings its data and its model; the rest is lesson 07's: the flags and their resolver, DDP,
AdamW, the schedule, the step, the loop with its checkpoints, --resume and stop signals, metrics.jsonl.
Data (chat_data.py): JSONL files of {"messages": [...]} (--data), a Hugging Face dataset (--hf_dataset),
or by default the offline instruction set (instructions.py); cut to max_seq_len by whole turns, packed.
With --lora only the adapters of lora.py train, and a checkpoint holds only them. At the end the best
model (adapters merged) is exported for Hugging Face with the chat template, into OUT_DIR/hf.

Commands (after the pretraining main job, which writes out/ckpt_best):
    python 08_sft/sft.py --base out/ckpt_best                                  # full fine-tuning, offline set
    python 08_sft/sft.py --base out/ckpt_best --lora --lora_rank 8 --out_dir out/sft_lora
    torchrun --standalone --nproc_per_node=2 08_sft/sft.py --base out/ckpt_best
    python 08_sft/sft.py --base out/ckpt_best --hf_dataset HuggingFaceH4/ultrachat_200k --hf_split train_sft
Left out on purpose: preference tuning (DPO/RLHF), torch.compile (07 has it; SFT runs are short), MFU.
"""

import argparse
import random
import sys
from importlib import import_module
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
tokenizer_lib = import_module("01_tokenizer.tokenizer")
weights = import_module("06_model.weights")
hf = import_module("06_model.hf")
train = import_module("07_pretrain_ddp.train")  # the step, the loop, the optimizer, DDP
config = import_module("07_pretrain_ddp.config")
data = import_module("07_pretrain_ddp.data")  # process setup, and its epoch-shuffled sampler, here over rows
checkpoint = import_module("07_pretrain_ddp.checkpoint")
metrics = import_module("07_pretrain_ddp.metrics")
template = import_module("08_sft.template")
lora = import_module("08_sft.lora")
chat_data = import_module("08_sft.chat_data")
evaluate = import_module("08_sft.evaluate")
bpb = import_module("09_eval.bpb")  # bits per byte of the answers, beside their loss


def finetune(cfg: dict, state: dict | None, run) -> dict:
    tokenizer_path = template.find_tokenizer(cfg["base"], cfg["tokenizer"])
    model, fmt = load_base(cfg, run.device, tokenizer_path)
    max_len, B, A = model.config.max_seq_len, cfg["batch_size"], cfg["grad_accum"]
    train_convs, val_convs = chat_data.train_val_conversations(*(cfg[k] for k in ("data", "val_data", "hf_dataset", "hf_split",
                                                                                  "hf_limit", "data_dir", "val_fraction")))
    examples, counts = chat_data.encode_all(fmt, train_convs, max_len)
    val_examples, _ = chat_data.encode_all(fmt, val_convs, max_len)
    # Rows are packed once, from a seeded shuffle; 07's sampler then reads them in a fresh order every epoch.
    random.Random(cfg["seed"]).shuffle(examples)
    rows = chat_data.pack(examples, max_len) if cfg["pack"] else examples
    val_rows = chat_data.pack(val_examples, max_len) if cfg["pack"] else val_examples
    if len(rows) < B * A * run.world or not val_rows:
        raise chat_data.DataError(f"{len(rows)} train rows and {len(val_rows)} val rows: fewer than one global batch of "
                                  f"{B * A * run.world} rows, or no validation; fix: more conversations or a smaller --batch_size")
    dtype, autocast = config.precision(cfg, run.device)

    torch.manual_seed(cfg["seed"])  # the same adapters' initialization on every rank
    if state is not None and run.rank == state["source_rank"]:  # its disk holds the checkpoint
        model = load_trained(cfg, Path(cfg["out_dir"]) / "ckpt_latest", run.device, model)
    elif cfg["lora"]:
        lora.apply_lora(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_targets"].split(","))
    if state is not None:
        checkpoint.broadcast_weights(model, state["source_rank"], run)
    torch.manual_seed(cfg["seed"] + run.rank)  # different dropout masks per rank
    optimizer = train.make_optimizer(model, cfg["lr"], cfg["weight_decay"], run.device)
    step, best_val, position = (0, float("inf"), 0) if state is None else checkpoint.restore(state, optimizer, run)
    sampler = data.RankSampler(data.WindowStream(len(rows), cfg["seed"]), B, run.rank, run.world, position)

    def to_device(batch_rows):
        return tuple(t.to(run.device) for t in chat_data.collate(batch_rows, fmt.eot_id))

    mine = val_rows[run.rank :: run.world]
    val_batches = [to_device(mine[i : i + B]) for i in range(0, len(mine), B)]
    prompts = evaluate.answer_prompts(val_convs[: cfg["eval_prompts"]])
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics.describe_run(cfg, run, model, [
        f"base {cfg['base']}: {model.num_params():,} parameters, {n_train:,} trained ({'LoRA' if cfg['lora'] else 'full'}), "
        f"on {run.device} ({dtype}), {run.world} process(es)",
        f"conversations: {len(train_convs):,} train ({counts['kept']:,} kept, {counts['truncated']:,} truncated by whole "
        f"turns, {counts['dropped']:,} dropped: longer than {max_len} tokens), {len(val_convs):,} val",
        f"rows of <= {max_len} tokens: {len(rows):,} train, {len(val_rows):,} val; global batch = {B} rows x {A} "
        f"micro-steps x {run.world} processes; one epoch = {len(rows) / (B * A * run.world):.1f} steps"])
    before = state["before"] if state is not None else {}
    if state is None and run.master:
        before["eot_rate"], answers = evaluate.end_of_turn_rate(model, fmt, prompts, cfg["answer_tokens"])
        print(f"base model: answers ending with </s>: {100 * before['eot_rate']:.0f}% of {len(prompts)}; e.g. {(answers or [''])[0][:80]!r}")
    log = metrics.Metrics(Path(cfg["out_dir"]) / "metrics.jsonl", step, run.master)
    adapters_only = (lambda d: lora.save_adapters(model, d / lora.ADAPTER_FILE, cfg["base"])) if cfg["lora"] else None
    token_bytes = bpb.token_byte_lengths(fmt.tokenizer, model.config.vocab_size)
    validate = lambda: train.evaluate(model, val_batches, run, autocast, token_bytes)  # noqa: E731
    result = train.fit(model, train.wrap_ddp(model, run), optimizer, lambda: [to_device([rows[i] for i in sampler.next_ids()]) for _ in range(A)],
                       validate, cfg, run, log, (step, best_val, sampler),
                       {"tokenizer_sha256": tokenizer_lib.tokenizer_sha256(tokenizer_path), "before": before}, autocast,
                       write_weights=adapters_only)
    if not (result["finished"] and run.master):
        return {"step": result["step"], "before": before}
    before["val_loss"] = log.records[0]["val_loss"]  # the step-0 evaluation of the base model
    after = {"val_loss": result["best_val_loss"]}
    best = lora.merge_lora(load_trained(cfg, Path(cfg["out_dir"]) / "ckpt_best", run.device))  # merged: a plain LilLM again
    after["eot_rate"], answers = evaluate.end_of_turn_rate(best, fmt, prompts, cfg["answer_tokens"])
    # with the chat template in tokenizer_config.json: apply_chat_template speaks the format it was tuned on
    hf.export_hf(best, tokenizer_path, Path(cfg["out_dir"]) / "hf", chat_template=template.CHAT_TEMPLATE)
    print(f"assistant-token val loss: base {before['val_loss']:.4f} -> fine-tuned {after['val_loss']:.4f}")
    print(f"answers ending with </s> within {cfg['answer_tokens']} tokens: base {100 * before['eot_rate']:.0f}% -> "
          f"fine-tuned {100 * after['eot_rate']:.0f}% of {len(prompts)} validation prompts")
    for (messages, reference), answer in list(zip(prompts, answers))[:3]:
        print(f"  {messages[-1]['content']!r} -> {answer!r} (reference {reference!r})")
    print(f"chat with it: python 08_sft/chat.py --checkpoint {Path(cfg['out_dir']) / 'ckpt_best'}   "
          f"(Hugging Face export with the chat template: {Path(cfg['out_dir']) / 'hf'})")
    return {"step": result["step"], "before": before, "after": after, "counts": counts}


def load_base(cfg: dict, device, tokenizer_path: Path):
    """The pretrained model and its tokenizer's ChatFormat, checked to belong together."""
    model = weights.load_model(cfg["base"], device)  # its FileNotFoundError says how to pretrain one
    fmt = template.ChatFormat(tokenizer_lib.load_tokenizer(tokenizer_path))
    if (Path(cfg["base"]) / checkpoint.STATE_FILE).is_file():  # a 07 checkpoint records which tokenizer made its token files
        expected = checkpoint.load_state(cfg["base"])["tokenizer_sha256"]
        if expected != tokenizer_lib.tokenizer_sha256(tokenizer_path):
            raise config.TrainError(f"{tokenizer_path} is not the tokenizer {cfg['base']} was trained with "
                                    f"(sha256 {expected[:12]}); pass that one with --tokenizer")
    if fmt.tokenizer.get_vocab_size() > model.config.vocab_size:  # every id the rows will hold fits the model
        raise config.TrainError(f"{tokenizer_path} has {fmt.tokenizer.get_vocab_size()} tokens, more than the base's {model.config.vocab_size}")
    return model, fmt


def load_trained(cfg: dict, ckpt_dir: Path, device, base=None):
    """The model of an SFT checkpoint: its weights, or the base (loaded unless given) with its adapters, unmerged."""
    if not cfg["lora"]:
        return checkpoint.load_model(ckpt_dir, device)
    path = checkpoint.find(ckpt_dir)
    if path is None:
        raise checkpoint.CheckpointError(f"no checkpoint at {ckpt_dir}; start a new run without --resume")
    return lora.load_adapters(base if base is not None else weights.load_model(cfg["base"], device), path)


# ---- flags: lesson 07's resolver, with this stage's defaults ----------------------------------------------

LORA_DEFAULTS = dict(lora=False, lora_rank=8, lora_alpha=16.0, lora_targets="wq,wk,wv,wo")  # also lessons 10-11's
SHAPE = ("base", *LORA_DEFAULTS)  # what a resumed run may not change, in every stage that starts from a base


def add_lora_flags(flag, base: str = "a frozen base") -> None:
    flag("lora", f"train LoRA adapters on {base} instead of every weight", action=argparse.BooleanOptionalAction)
    flag("lora_rank", "LoRA rank r", type=int)
    flag("lora_alpha", "LoRA alpha: the update is scaled by alpha / r", type=float)
    flag("lora_targets", f"comma-separated linear layers to adapt, from {','.join(lora.TARGETS)}")


DEFAULTS = dict(
    base="out/ckpt_best", tokenizer=None, data=None, val_data=None, hf_dataset=None, hf_split="train",
    hf_limit=0, data_dir="data/sft", val_fraction=0.05, out_dir="out/sft", pack=True, **LORA_DEFAULTS,
    batch_size=8, grad_accum=1, max_steps=200, lr=None, min_lr=None, warmup_steps=10, weight_decay=0.0, grad_clip=1.0,
    eval_interval=50, log_interval=10, eval_prompts=64, answer_tokens=48, seed=1337, device="auto", dtype="auto", stop_at=0, resume=False,
    dist_timeout=30.0,
)


def parse_args(argv=None) -> dict:
    parser, flag = config.make_parser(__doc__.split("\n")[0], {"default": DEFAULTS})
    flag("base", "the pretrained model: a lilLM checkpoint (07's out/ckpt_best), file, or Hugging Face Llama dir")
    flag("tokenizer", "tokenizer.json (None: beside the base, else data/tokenizer.json; checked against the base's sha256)")
    flag("data", "training conversations: JSONL files of {\"messages\": [...]} (None: the offline instruction set)", nargs="+")
    flag("val_data", "validation conversations, JSONL (None: a fixed val_fraction of --data or of the hub split)", nargs="+")
    flag("hf_dataset", "a Hugging Face dataset with a \"messages\" column, instead of --data (needs the hub)")
    flag("hf_split", "its split")
    flag("hf_limit", "read at most this many hub conversations; 0: all", type=int)
    flag("data_dir", "where the offline instruction set is written (instructions.py)")
    flag("val_fraction", "share of conversations held out when no --val_data is given (lesson 01's crc32 rule)", type=float)
    flag("pack", "pack whole conversations into rows of max_seq_len tokens (--no-pack: one per row, padded)",
         action=argparse.BooleanOptionalAction)
    add_lora_flags(flag)
    config.add_training_flags(flag)  # lr None: 3e-4 full, 1e-3 LoRA; min_lr None: lr / 10
    flag("eval_prompts", "validation prompts answered greedily for the end-of-turn rate, before and after", type=int)
    flag("answer_tokens", "longest answer, in tokens, for that measurement", type=int)
    return vars(parser.parse_args(argv))


def with_lr(defaults: dict, given: dict, full_lr: float) -> dict:
    """A stage's defaults with its learning rate: the given one, else 1e-3 with LoRA (the adapters start at zero:
    a larger step) or full_lr; min_lr lr / 10. Lessons 10 and 11 use it with their own full_lr."""
    lr = given.get("lr") or (1e-3 if given.get("lora", defaults["lora"]) else full_lr)
    return dict(defaults, lr=lr, min_lr=lr / 10)


def resolve_config(given: dict, saved: dict | None = None) -> dict:
    cfg = config.resolve(given, with_lr(DEFAULTS, given, 3e-4), saved, SHAPE, ("lora_rank", "eval_prompts", "answer_tokens"))
    if cfg["data"] and cfg["hf_dataset"]:
        raise config.TrainError("give --data or --hf_dataset, not both")
    return cfg


def main(argv=None) -> dict:
    """Flags -> config -> fine-tune, with lesson 07's one-line errors (exit code 2) for bad input."""
    with config.one_line_errors():
        return config.launch(parse_args(argv), resolve_config, build_instruction_set, finetune)


def build_instruction_set(cfg: dict) -> None:
    """The offline instruction set, built when no --data or --hf_dataset is given (run through build_once)."""
    if not (cfg["data"] or cfg["hf_dataset"]):
        chat_data.default_data(cfg["data_dir"])


if __name__ == "__main__":
    main()
