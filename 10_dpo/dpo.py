"""Direct Preference Optimization (DPO): push a chat model toward the better of two answers, with no reward
model and no sampling loop (Rafailov et al., 2023, arXiv:2305.18290).

    r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))              the implicit reward of answer y to prompt x
    L       = - log sigmoid( r(x, y_w) - r(x, y_l) )              per pair: y_w chosen, y_l rejected

pi is the policy being trained, pi_ref the frozen SFT model it starts from; log pi(y|x) sums the answer's token
log-probs (lesson 08's mask). beta prices how far pi may move from pi_ref (notes.md §1 derives L from RLHF's
max E[reward] - beta KL(pi || pi_ref)). At initialization pi = pi_ref: every reward is 0 and L = ln 2. The
reference's log-probs are computed once per pair, before any LoRA adapter exists, and travel with the batches:
no second model is held. The rest is lesson 07's loop with DPOObjective, logging TRL's figure names.

Commands (after lesson 08, which writes out/sft/ckpt_best):
    python 10_dpo/dpo.py --base out/sft/ckpt_best                   # full fine-tuning on the offline pairs
    python 10_dpo/dpo.py --base out/sft/ckpt_best --lora --out_dir out/dpo_lora
    torchrun --standalone --nproc_per_node=2 10_dpo/dpo.py --base out/sft/ckpt_best
    python 10_dpo/dpo.py --base out/sft/ckpt_best --data pairs.jsonl   # {"prompt", "chosen", "rejected"} per line
    python 10_dpo/dpo.py --base out/sft/ckpt_best --hf_dataset HuggingFaceH4/ultrafeedback_binarized --hf_split train_prefs
Left out on purpose: IPO and the other losses (notes.md), a reward model, label smoothing, length
normalization, reference updates (TR-DPO), torch.compile.
"""

import random
import sys
import time
from importlib import import_module
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
tokenizer_lib = import_module("01_tokenizer.tokenizer")
hf = import_module("06_model.hf")
train = import_module("07_pretrain_ddp.train")  # the step, the loop, the optimizer, DDP
stage = import_module("07_pretrain_ddp.stage")  # flags, resolver, loading the base, launch
windows = import_module("07_pretrain_ddp.data")  # its epoch-shuffled sampler, here over pairs
checkpoint = import_module("07_pretrain_ddp.checkpoint")
metrics = import_module("07_pretrain_ddp.metrics")
template = import_module("08_sft.template")
lora = import_module("08_sft.lora")
sft = import_module("08_sft.sft")  # target_logps
data = import_module("10_dpo.data")  # the pairs
evaluation = import_module("10_dpo.eval")  # the closing figures
IGNORE = train.IGNORE


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> tuple:
    """(losses, chosen rewards, rejected rewards), each (P,), from the summed answer log-probs, each (P,)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)  # (P,)
    rejected_rewards = beta * (policy_rejected - ref_rejected)  # (P,)
    # -log sigmoid(z) through logsigmoid: stable where sigmoid(z) rounds to 0 (log 0 = -inf)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)  # (P,)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def sequence_logps(model, inputs, targets):
    """(R,) log pi(answer | prompt) of each row of inputs, targets (R, T): lesson 08's target_logps, summed."""
    return sft.target_logps(model, inputs, targets).sum(dim=1)  # (R,)


FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def pair_figures(logps, ref, beta: float) -> tuple:
    """(summed loss, {figure: sum over pairs}) of a micro-batch: logps, ref (2P,), the P chosen rows first."""
    (chosen, rejected), (ref_chosen, ref_rejected) = logps.chunk(2), ref.chunk(2)
    losses, r_w, r_l = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    values = (r_w, r_l, (r_w > r_l).float(), r_w - r_l, chosen.detach(), rejected.detach())  # TRL's figures
    return losses.sum(), {name: v.sum() for name, v in zip(FIGURES, values)}


class DPOObjective:
    """Lesson 07's objective: a micro-batch (inputs (2P, T), targets (2P, T), reference log-probs (2P,))
    holds P pairs; its loss is summed over them, and train_step divides by the global batch's pairs."""

    def __init__(self, beta: float):
        self.beta = beta

    def count(self, batch):
        return torch.tensor(len(batch[2]) // 2, device=batch[2].device)

    def loss_sum(self, model, batch) -> tuple:
        inputs, targets, ref = batch
        return pair_figures(sequence_logps(model, inputs, targets), ref, self.beta)


def by_length(encoded: list, size: int) -> list:
    """The pairs' indices in chunks of `size`, shortest first: a forward that only reads wastes little on padding."""
    order = sorted(range(len(encoded)), key=lambda i: max(len(ids) for ids, _ in encoded[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def pair_logps(model, encoded: list, chunks: list, run, autocast, pad_id: int) -> torch.Tensor:
    """(N, 2): log pi of every pair's chosen and rejected answer by `model` as it is now. The chunks are dealt to
    the ranks like cards and the others add zeros, so every rank gets the same values whatever the world size."""
    out, was_training = torch.zeros(len(encoded), 2, device=run.device), model.training
    model.eval()
    for chunk in chunks[run.rank :: run.world]:
        x, y = (t.to(run.device) for t in data.collate([encoded[i] for i in chunk], pad_id))
        with autocast:
            logps = sequence_logps(model, x, y)
        out[chunk] = torch.stack(logps.chunk(2), dim=1)  # (P, 2)
    model.train(was_training)
    if run.ddp:
        dist.all_reduce(out)
    return out


def validate(logps, ref, beta: float) -> dict:
    """The DPO loss and TRL's figures, means over the validation pairs (logps, ref (N, 2) by pair_logps), plus
    val_preference_accuracy: the share of pairs where log pi(chosen) > log pi(rejected)."""
    loss, figures = pair_figures(logps.T.flatten().double(), ref.T.flatten().double(), beta)  # (2N,): chosen answers first
    n, preferred = len(logps), (logps[:, 0] > logps[:, 1]).double().mean().item()
    return {"val_loss": loss.item() / n, **{f"val_{k}": v.item() / n for k, v in figures.items()},
            "val_preference_accuracy": preferred}


def prefer(cfg: dict, state: dict | None, run) -> dict:
    started = time.perf_counter()
    model, tok, tokenizer_path = stage.load_base(cfg, run.device)  # a LoRA --base comes merged: the SFT model
    fmt, max_len, B, A = template.ChatFormat(tok), model.config.max_seq_len, cfg["batch_size"], cfg["grad_accum"]
    train_pairs, val_pairs = data.pairs_of(cfg)
    random.Random(cfg["seed"]).shuffle(train_pairs)  # a seeded subset when --max_pairs cuts: the reference scores each once
    encoded, _ = data.encode_pairs(fmt, train_pairs[: cfg["max_pairs"] or None], max_len)
    val_encoded, val_kept = data.encode_pairs(fmt, val_pairs[: cfg["val_pairs"] or None], max_len)
    if len(encoded) < B * A * run.world or len(val_encoded) < run.world:
        raise data.DataError(f"{len(encoded)} train and {len(val_encoded)} val pairs fit {max_len} tokens: fewer than one global "
                             f"batch of {B * A * run.world} pairs, or than one val pair per process; fix: more pairs or a smaller --batch_size")
    dtype, autocast = stage.precision(cfg, run.device)

    # The reference: the SFT model as loaded, before any step and any adapter. Its log-probs, once per pair.
    scoring = time.perf_counter()
    ref = pair_logps(model, encoded, by_length(encoded, B), run, autocast, fmt.eot_id)  # (N, 2)
    val_chunks = by_length(val_encoded, B)  # validation reads the very chunks its reference was computed on
    score_val = lambda m, r=run: pair_logps(m, val_encoded, val_chunks, r, autocast, fmt.eot_id)
    val_ref = score_val(model)  # (N_val, 2)
    scored = time.perf_counter() - scoring

    adapt, load, write_weights = lora.hooks(cfg, model)
    model = stage.start_model(cfg, state, run, model, adapt, load)
    for m in model.modules():  # dropout off, as TRL does: the reference was scored without it (step 0's rewards are 0)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    optimizer = train.make_optimizer(model, cfg["lr"], cfg["weight_decay"], run.device, cfg["optimizer"], cfg["muon_lr"])
    step, best_val, position = checkpoint.restore(state, optimizer, run)
    sampler = windows.RankSampler(windows.WindowStream(len(encoded), cfg["seed"]), B, run.rank, run.world, position)

    def micro_batch():  # (inputs (2P, T), targets (2P, T), reference log-probs (2P,)): the P chosen rows first
        ids = torch.as_tensor(sampler.next_ids())
        x, y = data.collate([encoded[i] for i in ids.tolist()], fmt.eot_id)
        return x.to(run.device), y.to(run.device), ref[ids].T.flatten().to(run.device)

    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stage.describe_run(cfg, run, model, [
        (f"SFT model {cfg['base']}: {model.num_params():,} parameters, {n_train:,} trained ({'LoRA' if cfg['lora'] else 'full'}), "
         f"beta {cfg['beta']}, on {run.device} ({dtype}), {run.world} process(es)"),
        (f"pairs: {len(encoded):,} train, {len(val_encoded):,} val (of {len(train_pairs):,} and {len(val_pairs):,}; longer than "
         f"{max_len} tokens: dropped); global batch = {B} pairs x {A} micro-steps x {run.world} processes; one epoch = "
         f"{len(encoded) / (B * A * run.world):.1f} steps; the reference scored them in {scored:.1f} s")], template.CHAT_TEMPLATE)
    before = state["before"] if state is not None else {}
    if state is None and run.master:
        before = evaluation.sft_figures(model, fmt, val_kept, val_ref, cfg)
    log = metrics.Metrics(Path(cfg["out_dir"]) / "metrics.jsonl", step, run.master)
    result = train.fit(model, train.wrap_ddp(model, run), optimizer, lambda: [micro_batch() for _ in range(A)],
                       lambda: validate(score_val(model), val_ref, cfg["beta"]), cfg, run, log, (step, best_val, sampler),
                       {"tokenizer_sha256": tokenizer_lib.tokenizer_sha256(tokenizer_path), "before": before}, autocast,
                       write_weights=write_weights, objective=DPOObjective(cfg["beta"]))
    if not (result["finished"] and run.master):
        return {"step": result["step"], "finished": result["finished"], "before": before}
    out_dir, solo = Path(cfg["out_dir"]), stage.Run(False, 0, 0, 1, run.device)  # rank 0 alone: no collective
    best = checkpoint.load_model(out_dir / "ckpt_best", run.device).eval()  # LoRA: merged onto the SFT model
    after = evaluation.report(cfg, best, stage.load_base(cfg, run.device)[0].eval(), fmt, (val_kept, val_ref, score_val(best, solo)),
                              log.records, result["best_val_loss"], before)
    hf.export_hf(best, tokenizer_path, out_dir / "hf", chat_template=template.CHAT_TEMPLATE)
    print(f"wall time {time.perf_counter() - started:.0f} s; chat with it: python 08_sft/chat.py --checkpoint {out_dir / 'ckpt_best'}"
          f"   (Hugging Face export with the chat template: {out_dir / 'hf'})")
    return {"step": result["step"], "finished": result["finished"], "before": before, "after": after}


DEFAULTS = dict(stage.POST_TRAINING, **stage.HUB, base="out/sft/ckpt_best", data_dir=data.DEFAULT_DIR, out_dir="out/dpo", beta=0.1,
                max_pairs=2400, val_pairs=256, **lora.LORA_DEFAULTS, batch_size=16, max_steps=150, warmup_steps=10,
                eval_prompts=128, answer_tokens=32)


def parse_args(argv=None) -> dict:
    parser, flag = stage.make_parser("DPO: align a lilLM chat model with pairs of better and worse answers.", {"default": DEFAULTS})
    stage.add_post_training_flags(flag, "the SFT model, also the reference: a lilLM checkpoint (08's out/sft/ckpt_best; LoRA "
                                  "adapters load merged), file, or Hugging Face export", '{"prompt", "chosen", "rejected"} (TRL\'s)')
    flag("beta", "DPO's beta: the price of moving away from the reference (small: far, large: stay close)", type=float)
    flag("max_pairs", "train on a seeded subset of this many pairs (the reference scores each once, at the start); 0: all", type=int)
    flag("val_pairs", "validation pairs, the first of the set; 0: all", type=int)
    lora.add_lora_flags(flag, "the frozen SFT model")
    stage.add_training_flags(flag)  # lr None: 1e-4 full, 1e-3 LoRA; min_lr None: lr / 10
    flag("eval_prompts", "validation prompts answered greedily (exact answers) and sampled (KL), before and after", type=int)
    flag("answer_tokens", "longest answer, in tokens, for those measurements", type=int)
    return vars(parser.parse_args(argv))


def resolve_config(given: dict, saved: dict | None = None) -> dict:
    cfg = stage.resolve(given, lora.with_lr(DEFAULTS, given, 1e-4), saved, lora.SHAPE, ("lora_rank", "eval_prompts", "answer_tokens"))
    if cfg["beta"] <= 0 or cfg["max_pairs"] < 0 or cfg["val_pairs"] < 0:
        raise stage.TrainError(f"need beta > 0, max_pairs >= 0 and val_pairs >= 0; got {cfg['beta']}, {cfg['max_pairs']}, {cfg['val_pairs']}")
    return cfg


def build(cfg: dict) -> None:  # the offline preference set, when no --data or --hf_dataset is given
    if not (cfg["data"] or cfg["hf_dataset"]):
        data.default_data(cfg["data_dir"])


def main(argv=None) -> dict:
    return stage.main(parse_args(argv), resolve_config, build, prefer)


if __name__ == "__main__":
    main()
