"""Direct Preference Optimization (DPO): push a chat model toward the better of two answers, with no reward
model and no sampling loop (Rafailov et al., 2023, arXiv:2305.18290).

    r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))              the implicit reward of answer y to prompt x
    L       = - log sigmoid( r(x, y_w) - r(x, y_l) )              per pair: y_w chosen, y_l rejected

pi is the policy being trained, pi_ref the frozen SFT model it starts from; log pi(y|x) sums the answer's
token log-probs (lesson 08's mask: the answer and its </s>). notes.md derives L from RLHF's objective,
max E[reward] - beta KL(pi || pi_ref): beta prices how far the policy may move from the reference.
At initialization pi = pi_ref, so every reward is 0 and L = ln 2. A step's loss is the mean over the
global batch's pairs (07's train_step divides by the pair count N, counted before any backward).

The reference never changes, so its log-probs are computed once per pair, before the first step, by the
SFT model as loaded (and before any LoRA adapter exists), and travel with the batches: a step runs one
policy forward per answer and no second model is ever held. With --lora the policy is lesson 08's
adapters on the frozen SFT weights, and the reference is the same weights with the adapters off.

The rest is lesson 07's loop through its objective hook (DPOObjective): DDP, the step, checkpoints,
--resume, stop signals, metrics.jsonl with TRL's names (rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected). Pairs: preferences.py.

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
from contextlib import contextmanager
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
config = import_module("07_pretrain_ddp.config")
data = import_module("07_pretrain_ddp.data")
checkpoint = import_module("07_pretrain_ddp.checkpoint")
metrics = import_module("07_pretrain_ddp.metrics")
template = import_module("08_sft.template")
lora = import_module("08_sft.lora")
sft = import_module("08_sft.sft")  # loading the SFT model, and a trained checkpoint with or without adapters
preferences = import_module("10_dpo.preferences")
evaluate = import_module("10_dpo.evaluate")
flags = import_module("10_dpo.flags")  # DEFAULTS, parse_args, resolve_config
IGNORE = -100


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> tuple:
    """(losses, chosen rewards, rejected rewards), each (P,), from the summed answer log-probs, each (P,)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)  # (P,)
    rejected_rewards = beta * (policy_rejected - ref_rejected)  # (P,)
    # -log sigmoid(z) through logsigmoid: stable where sigmoid(z) rounds to 0 (log 0 = -inf)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)  # (P,)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def sequence_logps(model, inputs, targets):
    """(R,) log pi(answer | prompt) of each row: the sum of its target tokens' log-probs (targets != IGNORE).
    inputs, targets: (R, T) as lesson 08's collate makes them."""
    logits, _ = model(inputs)  # (R, T, V)
    R, T, V = logits.shape
    # cross_entropy = -log_softmax at the target, 0 where ignored; float32, as the model's own loss
    nll = F.cross_entropy(logits.float().view(R * T, V), targets.reshape(R * T), ignore_index=IGNORE, reduction="none")
    return -nll.view(R, T).sum(dim=1)  # (R,)


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
def reference_logps(model, encoded: list, chunks: list, run, autocast, pad_id: int) -> torch.Tensor:
    """(N, 2): log pi_ref of every pair's chosen and rejected answer, by `model` as it is now. The chunks
    (by_length) are dealt to the ranks like cards; each value is computed by one rank and the others add
    zeros, so every rank gets the same values whatever the world size."""
    out = torch.zeros(len(encoded), 2, device=run.device)
    model.eval()
    for chunk in chunks[run.rank :: run.world]:
        x, y = (t.to(run.device) for t in preferences.collate([encoded[i] for i in chunk], pad_id))
        with autocast:
            logps = sequence_logps(model, x, y)
        out[chunk] = torch.stack(logps.chunk(2), dim=1)  # (P, 2)
    model.train()
    if run.ddp:
        dist.all_reduce(out)
    return out


@torch.no_grad()
def validate(model, batches: list, beta: float, run, autocast) -> dict:
    """The DPO loss and figures, means over every rank's validation pairs (the same on all ranks), plus
    val_preference_accuracy: the share of pairs where log pi(chosen) > log pi(rejected)."""
    total = torch.zeros(len(FIGURES) + 3, dtype=torch.float64, device=run.device)  # loss, figures, preferred, pairs
    model.eval()
    for inputs, targets, ref in batches:
        with autocast:
            logps = sequence_logps(model, inputs, targets)
        loss, figures = pair_figures(logps, ref, beta)
        chosen, rejected = logps.chunk(2)
        total += torch.stack([loss, *figures.values(), (chosen > rejected).float().sum(), chosen.new_tensor(len(chosen))]).double()
    model.train()
    if run.ddp:
        dist.all_reduce(total)
    *sums, n = total.tolist()
    return {f"val_{k}": v / n for k, v in zip(("loss", *FIGURES, "preference_accuracy"), sums)}


@contextmanager
def adapters_off(model):
    """The reference inside a LoRA policy, with no second copy of the weights: every adapter's scale at 0,
    so each layer computes W x + 0 * (B A x) = W x exactly, the SFT model's output."""
    modules = lora.lora_modules(model)
    scales = {name: m.scale for name, m in modules.items()}
    for m in modules.values():
        m.scale = 0.0
    try:
        yield model
    finally:
        for name, m in modules.items():
            m.scale = scales[name]


def prefer(cfg: dict, state: dict | None, run) -> dict:
    started = time.perf_counter()
    tokenizer_path = template.find_tokenizer(cfg["base"], cfg["tokenizer"])
    model, fmt = load_sft(cfg, run.device, tokenizer_path)
    max_len, B, A = model.config.max_seq_len, cfg["batch_size"], cfg["grad_accum"]
    train_pairs, val_pairs = preferences.train_val_pairs(*(cfg[k] for k in ("data", "val_data", "hf_dataset", "hf_split",
                                                                             "hf_limit", "data_dir", "val_fraction")))
    random.Random(cfg["seed"]).shuffle(train_pairs)  # a seeded subset when --max_pairs cuts: the reference scores each once
    encoded, _ = preferences.encode_pairs(fmt, train_pairs[: cfg["max_pairs"] or None], max_len)
    val_encoded, val_kept = preferences.encode_pairs(fmt, val_pairs[: cfg["val_pairs"] or None], max_len)
    if len(encoded) < B * A * run.world or len(val_encoded) < run.world:
        raise preferences.DataError(f"{len(encoded)} train and {len(val_encoded)} val pairs fit {max_len} tokens: fewer than one global "
                                    f"batch of {B * A * run.world} pairs, or than one val pair per process; fix: more pairs or a smaller --batch_size")
    dtype, autocast = config.precision(cfg, run.device)

    # The reference: the SFT model as loaded, before any step and any adapter. Its log-probs, once per pair.
    scoring = time.perf_counter()
    ref = reference_logps(model, encoded, by_length(encoded, B), run, autocast, fmt.eot_id)  # (N, 2)
    val_chunks = by_length(val_encoded, B)  # validation reads the very chunks its reference was computed on
    val_ref = reference_logps(model, val_encoded, val_chunks, run, autocast, fmt.eot_id)  # (N_val, 2)
    val_batches = [to_device([val_encoded[i] for i in c], val_ref[c], fmt, run) for c in val_chunks[run.rank :: run.world]]

    torch.manual_seed(cfg["seed"])  # the same adapters' initialization on every rank
    if state is not None and run.rank == state["source_rank"]:  # its disk holds the checkpoint
        model = sft.load_trained(cfg, Path(cfg["out_dir"]) / "ckpt_latest", run.device, model)
    elif cfg["lora"]:
        lora.apply_lora(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_targets"].split(","))
    if state is not None:
        checkpoint.broadcast_weights(model, state["source_rank"], run)
    no_dropout(model)
    optimizer = train.make_optimizer(model, cfg["lr"], cfg["weight_decay"], run.device)
    step, best_val, position = (0, float("inf"), 0) if state is None else checkpoint.restore(state, optimizer, run)
    sampler = data.RankSampler(data.WindowStream(len(encoded), cfg["seed"]), B, run.rank, run.world, position)

    def micro_batch():
        ids = torch.as_tensor(sampler.next_ids())
        return to_device([encoded[i] for i in ids.tolist()], ref[ids], fmt, run)

    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics.describe_run(cfg, run, model, [
        f"SFT model {cfg['base']}: {model.num_params():,} parameters, {n_train:,} trained ({'LoRA' if cfg['lora'] else 'full'}), "
        f"beta {cfg['beta']}, on {run.device} ({dtype}), {run.world} process(es)",
        f"pairs: {len(encoded):,} train, {len(val_encoded):,} val (of {len(train_pairs):,} and {len(val_pairs):,}; longer than {max_len} "
        f"tokens: dropped); global batch = {B} pairs x {A} micro-steps x {run.world} processes; one epoch = "
        f"{len(encoded) / (B * A * run.world):.1f} steps; the reference scored them in {time.perf_counter() - scoring:.1f} s"])
    before = state["before"] if state is not None else {}
    if state is None and run.master:
        before = {"exact": evaluate.exact_answer_rate(model, fmt, val_kept[: cfg["eval_prompts"]], cfg["answer_tokens"]),
                  "preference_accuracy": (val_ref[:, 0] > val_ref[:, 1]).float().mean().item(),
                  "logps/chosen": val_ref[:, 0].mean().item(), "logps/rejected": val_ref[:, 1].mean().item()}
    log = metrics.Metrics(Path(cfg["out_dir"]) / "metrics.jsonl", step, run.master)
    adapters_only = (lambda d: lora.save_adapters(model, d / lora.ADAPTER_FILE, cfg["base"])) if cfg["lora"] else None
    result = train.fit(model, train.wrap_ddp(model, run), optimizer, lambda: [micro_batch() for _ in range(A)],
                       lambda: validate(model, val_batches, cfg["beta"], run, autocast), cfg, run, log, (step, best_val, sampler),
                       {"tokenizer_sha256": tokenizer_lib.tokenizer_sha256(tokenizer_path), "before": before}, autocast,
                       write_weights=adapters_only, objective=DPOObjective(cfg["beta"]))
    if not (result["finished"] and run.master):
        return {"step": result["step"], "before": before}
    return finish(cfg, log, result, before, (val_encoded, val_kept, val_ref), fmt, tokenizer_path, run, started)


def finish(cfg, log, result, before, val, fmt, tokenizer_path, run, started) -> dict:
    """Rank 0, after the last step: the best checkpoint against the SFT model (evaluate.report), and its export."""
    out_dir, (val_encoded, val_kept, val_ref), B = Path(cfg["out_dir"]), val, cfg["batch_size"]
    best = sft.load_trained(cfg, out_dir / "ckpt_best", run.device).eval()  # LoRA: the SFT model + adapters, unmerged
    if cfg["lora"]:
        def reference_logits(x):  # the reference inside the policy: no second copy
            with adapters_off(best):
                return best(x)[0]
    else:
        reference = load_sft(cfg, run.device, tokenizer_path)[0].eval()
        reference_logits = lambda x: reference(x)[0]  # noqa: E731
    solo, kinds = data.Run(False, 0, 0, 1, run.device), {}  # rank 0 alone: no collective
    for kind in sorted({p.kind for p in val_kept}):  # the validation pairs by kind: which preferences were learnt
        idx = [i for i, p in enumerate(val_kept) if p.kind == kind]
        batches = [to_device([val_encoded[i] for i in idx[k : k + B]], val_ref[idx[k : k + B]], fmt, solo) for k in range(0, len(idx), B)]
        kinds[kind] = ((val_ref[idx, 0] > val_ref[idx, 1]).float().mean().item(),
                       validate(best, batches, cfg["beta"], solo, config.precision(cfg, run.device)[1]))
    after = evaluate.report(best, reference_logits, fmt, val_kept[: cfg["eval_prompts"]], before, kinds, log.records,
                            result["best_val_loss"], cfg["answer_tokens"], cfg["seed"])
    hf.export_hf(lora.merge_lora(best), tokenizer_path, out_dir / "hf", chat_template=template.CHAT_TEMPLATE)
    print(f"wall time {time.perf_counter() - started:.0f} s; chat with it: python 08_sft/chat.py --checkpoint {out_dir / 'ckpt_best'}"
          f"   (Hugging Face export with the chat template: {out_dir / 'hf'})")
    return {"step": result["step"], "before": before, "after": after}


def to_device(pairs: list, ref, fmt, run) -> tuple:
    """(inputs (2P, T), targets (2P, T), reference log-probs (2P,)) on the device: the chosen rows first."""
    x, y = preferences.collate(pairs, fmt.eot_id)
    return x.to(run.device), y.to(run.device), torch.cat([ref[:, 0], ref[:, 1]]).to(run.device)


def no_dropout(model) -> None:
    """Dropout off in the policy (as TRL does): the reference's log-probs were computed without it, and a
    policy with dropout would differ from the reference at step 0 by noise alone (the rewards would not be 0)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def load_sft(cfg: dict, device, tokenizer_path: Path):
    """The SFT model (full weights: a checkpoint, a file, or a Hugging Face export) and its ChatFormat,
    the tokenizer checked against the one it was trained with (lesson 08's load_base)."""
    if (Path(cfg["base"]) / lora.ADAPTER_FILE).is_file():
        raise config.TrainError(f"{cfg['base']} holds LoRA adapters, not a model: pass the SFT run's merged export "
                                f"({Path(cfg['base']).parent / 'hf'}) as --base")
    return sft.load_base(cfg, device, tokenizer_path)


def main(argv=None) -> dict:
    """Flags -> config -> DPO, with lesson 07's one-line errors (exit code 2) for bad input."""
    with config.one_line_errors():
        return config.launch(flags.parse_args(argv), flags.resolve_config, build_preference_set, prefer)


def build_preference_set(cfg: dict) -> None:
    """The offline preference set, built when no --data or --hf_dataset is given (run through build_once)."""
    if not (cfg["data"] or cfg["hf_dataset"]):
        preferences.default_data(cfg["data_dir"])


if __name__ == "__main__":
    main()
