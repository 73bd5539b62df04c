"""Supervised fine-tuning (SFT): a pretrained LilLM becomes a chat model, by full fine-tuning or LoRA.

    conversation  ->  ids x_0..x_n and mask m_0..m_n   (template.py: m_i is True on the assistant's tokens and </s>)
    inputs  = x_0 .. x_{n-1}
    targets = x_{i+1} where m_{i+1} else IGNORE                   the prompt's tokens are context, never targets
    loss    = - (1 / N) * sum over targets i of log p(x_{i+1} | x_<=i),   N = targets in the global batch

The same next-token loss as pretraining, counted only where the assistant speaks: the model learns to answer
and to end its turn with </s>, not to imitate users. N is counted over the whole global batch by lesson 07's
train_step, so a token weighs the same in a short or a long micro-batch (notes.md §1). The loss alone cannot
tell a chat model from a base model, so SFT is also measured by the end-of-turn rate: do greedy answers say
something, then stop?

The stage is lesson 07's loop (DDP, AdamW, the schedule, checkpoints, --resume, stop signals) on rows of
packed conversations (data.py); with --lora only lora.py's adapters train, and a checkpoint holds only them.
At the end the best model (adapters merged) is exported for Hugging Face with the chat template, OUT_DIR/hf.

Commands (after the pretraining main job, which writes out/ckpt_best):
    python 08_sft/sft.py --base out/ckpt_best                                  # full fine-tuning, offline set
    python 08_sft/sft.py --base out/ckpt_best --lora --lora_rank 8 --out_dir out/sft_lora
    torchrun --standalone --nproc_per_node=2 08_sft/sft.py --base out/ckpt_best
    python 08_sft/sft.py --base out/ckpt_best --hf_dataset HuggingFaceH4/ultrachat_200k --hf_split train_sft
Left out on purpose: torch.compile (07 has it; SFT runs are short), MFU.
"""

import argparse
import random
import sys
from importlib import import_module
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
tokenizer_lib = import_module("01_tokenizer.tokenizer")
generate = import_module("06_model.generate")
hf = import_module("06_model.hf")
train = import_module("07_pretrain_ddp.train")  # the step, the loop, the optimizer, DDP
stage = import_module("07_pretrain_ddp.stage")  # flags, resolver, launch
windows = import_module("07_pretrain_ddp.data")  # its epoch-shuffled sampler, here over rows
checkpoint = import_module("07_pretrain_ddp.checkpoint")
metrics = import_module("07_pretrain_ddp.metrics")
template = import_module("08_sft.template")
lora = import_module("08_sft.lora")
data = import_module("08_sft.data")
IGNORE = train.IGNORE


def collate(rows: list, pad_id: int) -> tuple:
    """Rows [(ids, mask)] -> (inputs (B, T), targets (B, T)), T = longest row - 1: token t predicts token t + 1,
    and the target is IGNORE where token t + 1 is not an assistant token or is padding. Any pad_id will do: the
    padding comes after a row's last token, where the causal mask hides it from every real position."""
    inputs = [torch.tensor(ids[:-1], dtype=torch.long) for ids, _ in rows]
    targets = [torch.where(torch.tensor(mask[1:], dtype=torch.bool), torch.tensor(ids[1:], dtype=torch.long), IGNORE)
               for ids, mask in rows]
    return (pad_sequence(inputs, batch_first=True, padding_value=pad_id),  # (B, T)
            pad_sequence(targets, batch_first=True, padding_value=IGNORE))  # (B, T)


def target_logps(model, inputs, targets, temperature: float = 1.0) -> torch.Tensor:
    """(B, T): log p(targets[b, t] | inputs[b, :t+1]) under softmax(logits / temperature), 0 where the target is
    IGNORE. SFT's loss is minus their mean; lesson 10 sums them per answer, lesson 11 weighs them per token."""
    logits, _ = model(inputs)  # (B, T, vocab)
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # float32, as the model's own cross-entropy
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked.masked_fill(targets == IGNORE, 0.0)


def answer_prompts(convs: list) -> list:
    """Each conversation cut before its last answer: (the messages that prompt it, the reference answer)."""
    out = []
    for messages in convs:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append((messages[:last], messages[last]["content"]))
    return out


def end_of_turn_rate(model, fmt, prompts: list, max_new_tokens: int) -> tuple:
    """(share of greedy answers that say something and then end with </s> within max_new_tokens, the answers'
    texts). An empty answer does not count: "</s>" alone is not following the format."""
    encoded = [fmt.encode(messages, add_generation_prompt=True)[0] for messages, _ in prompts]
    encoded = [ids for ids in encoded if len(ids) + max_new_tokens <= model.config.max_seq_len]
    ended, texts, B = 0, [], model.config.max_batch_size
    for i in range(0, len(encoded), B):
        for new in generate.generate(model, encoded[i : i + B], max_new_tokens, stop_id=fmt.eot_id):
            ended += len(new) > 1 and new[-1] == fmt.eot_id
            texts.append(fmt.tokenizer.decode(new))  # special tokens (the </s>) are not printed
    return ended / max(1, len(encoded)), texts


def finetune(cfg: dict, state: dict | None, run) -> dict:
    model, tok, tokenizer_path = stage.load_base(cfg, run.device)
    fmt, max_len, B, A = template.ChatFormat(tok), model.config.max_seq_len, cfg["batch_size"], cfg["grad_accum"]
    train_convs, val_convs = data.conversations_of(cfg)
    examples, counts = data.encode_all(fmt, train_convs, max_len)
    val_examples, _ = data.encode_all(fmt, val_convs, max_len)
    random.Random(cfg["seed"]).shuffle(examples)  # packed once, from a seeded shuffle; the sampler reshuffles rows
    rows = data.pack(examples, max_len) if cfg["pack"] else examples
    val_rows = data.pack(val_examples, max_len) if cfg["pack"] else val_examples
    if len(rows) < B * A * run.world or not val_rows:
        raise data.DataError(f"{len(rows)} train rows and {len(val_rows)} val rows: fewer than one global batch of "
                             f"{B * A * run.world} rows, or no validation; fix: more conversations or a smaller --batch_size")
    dtype, autocast = stage.precision(cfg, run.device)
    adapt, load, write_weights = lora.hooks(cfg, model)
    model = stage.start_model(cfg, state, run, model, adapt, load)
    optimizer = train.make_optimizer(model, cfg["lr"], cfg["weight_decay"], run.device, cfg["optimizer"], cfg["muon_lr"])
    step, best_val, position = checkpoint.restore(state, optimizer, run)
    sampler = windows.RankSampler(windows.WindowStream(len(rows), cfg["seed"]), B, run.rank, run.world, position)

    def to_device(batch_rows):
        return tuple(t.to(run.device) for t in collate(batch_rows, fmt.eot_id))

    mine = val_rows[run.rank :: run.world]
    val_batches = [to_device(mine[i : i + B]) for i in range(0, len(mine), B)]
    prompts = answer_prompts(val_convs[: cfg["eval_prompts"]])
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stage.describe_run(cfg, run, model, [
        f"base {cfg['base']}: {model.num_params():,} parameters, {n_train:,} trained ({'LoRA' if cfg['lora'] else 'full'}), "
        f"on {run.device} ({dtype}), {run.world} process(es)",
        f"conversations: {len(train_convs):,} train ({counts['kept']:,} kept, {counts['truncated']:,} truncated by whole "
        f"turns, {counts['dropped']:,} dropped: longer than {max_len} tokens), {len(val_convs):,} val",
        f"rows of <= {max_len} tokens: {len(rows):,} train, {len(val_rows):,} val; global batch = {B} rows x {A} "
        f"micro-steps x {run.world} processes; one epoch = {len(rows) / (B * A * run.world):.1f} steps"], template.CHAT_TEMPLATE)
    before = state["before"] if state is not None else {}
    if state is None and run.master:
        before["eot_rate"], answers = end_of_turn_rate(model, fmt, prompts, cfg["answer_tokens"])
        print(f"base model: answers ending with </s>: {100 * before['eot_rate']:.0f}% of {len(prompts)}; e.g. {(answers or [''])[0][:80]!r}")
    log = metrics.Metrics(Path(cfg["out_dir"]) / "metrics.jsonl", step, run.master)
    token_bytes = tokenizer_lib.token_byte_lengths(tok, model.config.vocab_size)
    result = train.fit(model, train.wrap_ddp(model, run), optimizer, lambda: [to_device([rows[i] for i in sampler.next_ids()]) for _ in range(A)],
                       lambda: train.evaluate(model, val_batches, run, autocast, token_bytes), cfg, run, log, (step, best_val, sampler),
                       {"tokenizer_sha256": tokenizer_lib.tokenizer_sha256(tokenizer_path), "before": before}, autocast,
                       write_weights=write_weights)
    if not (result["finished"] and run.master):
        return {"step": result["step"], "finished": result["finished"], "before": before}
    out_dir = Path(cfg["out_dir"])
    before["val_loss"], after = log.records[0]["val_loss"], {"val_loss": result["best_val_loss"]}  # step 0: the base model
    best = checkpoint.load_model(out_dir / "ckpt_best", run.device)  # LoRA: merged onto the base, a plain LilLM
    after["eot_rate"], answers = end_of_turn_rate(best, fmt, prompts, cfg["answer_tokens"])
    hf.export_hf(best, tokenizer_path, out_dir / "hf", chat_template=template.CHAT_TEMPLATE)  # apply_chat_template speaks it
    print(f"assistant-token val loss: base {before['val_loss']:.4f} -> fine-tuned {after['val_loss']:.4f}")
    print(f"answers ending with </s> within {cfg['answer_tokens']} tokens: base {100 * before['eot_rate']:.0f}% -> "
          f"fine-tuned {100 * after['eot_rate']:.0f}% of {len(prompts)} validation prompts")
    for (messages, reference), answer in list(zip(prompts, answers))[:3]:
        print(f"  {messages[-1]['content']!r} -> {answer!r} (reference {reference!r})")
    print(f"chat with it: python 08_sft/chat.py --checkpoint {out_dir / 'ckpt_best'}   (Hugging Face export with the chat "
          f"template: {out_dir / 'hf'})")
    return {"step": result["step"], "finished": result["finished"], "before": before, "after": after, "counts": counts}


DEFAULTS = dict(stage.POST_TRAINING, **stage.HUB, base="out/ckpt_best", data_dir=data.DEFAULT_DIR, out_dir="out/sft", pack=True,
                **lora.LORA_DEFAULTS, batch_size=8, max_steps=200, warmup_steps=10, eval_prompts=64, answer_tokens=48)


def parse_args(argv=None) -> dict:
    parser, flag = stage.make_parser(__doc__.split("\n")[0], {"default": DEFAULTS})
    stage.add_post_training_flags(flag, "a lilLM checkpoint (07's out/ckpt_best), file, or Hugging Face Llama dir",
                                  '{"messages": [...]}')
    flag("pack", "pack whole conversations into rows of max_seq_len tokens (--no-pack: one per row, padded)",
         action=argparse.BooleanOptionalAction)
    lora.add_lora_flags(flag)
    stage.add_training_flags(flag)  # lr None: 3e-4 full, 1e-3 LoRA; min_lr None: lr / 10
    flag("eval_prompts", "validation prompts answered greedily for the end-of-turn rate, before and after", type=int)
    flag("answer_tokens", "longest answer, in tokens, for that measurement", type=int)
    return vars(parser.parse_args(argv))


def resolve_config(given: dict, saved: dict | None = None) -> dict:
    return stage.resolve(given, lora.with_lr(DEFAULTS, given, 3e-4), saved, lora.SHAPE, ("lora_rank", "eval_prompts", "answer_tokens"))


def build(cfg: dict) -> None:
    """The offline instruction set, built when no --data or --hf_dataset is given (run through stage.build_once)."""
    if not (cfg["data"] or cfg["hf_dataset"]):
        data.offline_set(cfg["data_dir"], data.build, "instruction set", "conversation")


def main(argv=None) -> dict:
    return stage.main(parse_args(argv), resolve_config, build, finetune)


if __name__ == "__main__":
    main()
