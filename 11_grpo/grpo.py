"""GRPO: a chat model samples answers, an exact checker scores them, the policy gradient raises what worked.

    rollout    per prompt q: G completions o_1..o_G ~ pi_old(. | q); rewards r_i = reward(o_i) in {0, 1} (tasks.py)
    advantage  A_i   = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)       the group is the baseline: no critic
    ratio      rho_t = pi_theta(o_t | q, o_<t) / pi_old(o_t | q, o_<t)        1 at the first step on a rollout
    loss       L     = (1/N) sum_i sum_t [ -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta k3_t ]
    k3         k3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1            >= 0; its mean estimates KL(pi_theta || pi_ref)

Group Relative Policy Optimization (Shao et al., 2024, arXiv:2402.03300), as DeepSeek-R1 trains with it. N is
the completion tokens of the whole global batch, so every token weighs the same (DAPO, arXiv:2503.14476);
--norm sequence averages each completion over its tokens first, then over completions, as the GRPO paper
writes it. A group whose rewards are all equal has A = 0: it gives no gradient and is counted in the log.
eps 0.2 and beta 0 are TRL's defaults; log-probs are those of softmax(logits / temperature), as TRL computes them.

A rollout is made inside next_micro_batches every --iterations optimizer steps, by each rank for its own
prompts (a group stays on its rank: its advantage needs no communication), with lesson 06's KV-cache
generate; the old and the reference model's log-probs are taken then. With --iterations > 1 the policy
moves away from pi_old between steps, the ratio leaves 1 and the clip bounds each step (notes.md).
The rest is lessons 07 and 08's: flags, DDP, AdamW, the schedule, the step, checkpoints, --resume, SIGTERM,
one-line errors, metrics.jsonl, full weights or LoRA. Plumbing (flags, loading, the log) is in config.py.

Commands (after lesson 08's SFT, which writes out/sft/ckpt_best; figures in BENCHMARKS.md):
    python 11_grpo/grpo.py --base out/sft/ckpt_best        # the 4-choice speaker task: the CPU main job's SFT model
                                                           # never answers it right (pass@8 0.004): nothing to learn
    python 11_grpo/tasks.py --sft 20000                    # so first a warm-up SFT on the form (notes.md §4), then GRPO:
    python 08_sft/sft.py --base out/sft/ckpt_best --data data/grpo/choice_sft.jsonl --out_dir out/sft_choice300 --max_steps 300 --lr 1e-3
    python 08_sft/sft.py --base out/sft_choice300/ckpt_best --data data/grpo/choice_sft.jsonl --out_dir out/sft_choice --max_steps 300 --lr 5e-4 --seed 7
    python 11_grpo/grpo.py --base out/sft_choice/ckpt_best  # pass@1 0.058 -> 0.079 (paired +0.021 +- 0.009), 6.5 min
    torchrun --standalone --nproc_per_node=2 11_grpo/grpo.py --base out/sft_choice/ckpt_best --grad_accum 1
    python 11_grpo/grpo.py --base out/sft_choice/ckpt_best --lora --out_dir out/grpo_lora
    python 11_grpo/grpo.py --base out/sft/ckpt_best --data mine.jsonl --val_data mine_val.jsonl   # {"prompt", "answer"}
Left out on purpose: learned reward models, a value network (PPO's critic), dynamic sampling and overlong
filtering (DAPO), sequence-level ratios (GSPO), a separate inference engine (vLLM) for the rollouts.
"""

import copy
import sys
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
train = import_module("07_pretrain_ddp.train")  # the loop, the step, the optimizer, DDP
data = import_module("07_pretrain_ddp.data")  # the epoch-shuffled sampler, here over prompts
checkpoint = import_module("07_pretrain_ddp.checkpoint")
template = import_module("08_sft.template")
chat_data = import_module("08_sft.chat_data")  # collate: rows -> (inputs, targets), IGNORE where not trained
lora = import_module("08_sft.lora")
tasks = import_module("11_grpo.tasks")
evaluate = import_module("11_grpo.evaluate")  # seeded sampling, pass@k
config = import_module("07_pretrain_ddp.config")  # TrainError, precision
grpo_config = import_module("11_grpo.config")  # flags, loading, the task's prompts, the log
IGNORE = chat_data.IGNORE


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards (groups, G) -> advantages (groups, G). std with Bessel's correction, as TRL computes it."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + eps)


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per sampled token: e^d - d - 1 >= 0 (d = ref - logp), 0 iff d = 0.
    Trap: in float32, exp(d) - d - 1 rounds below 0 for small d (about 2% of draws near 1e-4, down to -6e-8).
    expm1(d) - d in float64, cast back, stays >= 0: expm1 keeps the digits that exp(d) - 1 cancels away."""
    d = (ref_logp - logp).double()
    return (torch.expm1(d) - d).to(logp.dtype)


def clipped_surrogate(logp, old_logp, advantages, eps: float) -> tuple:
    """(per-token loss -min(rho A, clip(rho, 1-eps, 1+eps) A), where the clip cut the gradient); (B, T), A (B, 1).
    The min takes the clipped term only where it is the smaller (pessimistic) one: rho above 1+eps with A > 0, or
    below 1-eps with A < 0. There the term is a constant and the token's gradient is 0: no more push that way."""
    ratio = torch.exp(logp - old_logp)
    loss = -torch.min(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)
    cut = ((ratio > 1 + eps) & (advantages > 0)) | ((ratio < 1 - eps) & (advantages < 0))
    return loss, cut


def completion_logprobs(model, inputs, targets, temperature: float) -> torch.Tensor:
    """log pi(targets[b, t] | inputs[b, :t+1]) under softmax(logits / temperature), 0 where target is IGNORE: (B, T)."""
    logits, _ = model(inputs)  # (B, T, vocab)
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # float32: as the cross-entropy in lesson 06
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked.masked_fill(targets == IGNORE, 0.0)


class ClippedObjective:
    """What train.fit minimizes, over micro-batches (inputs, targets, advantages, old_logp or None, ref_logp).
    Units: completion tokens (--norm token) or completions (--norm sequence). Figures, per unit: the share
    of tokens whose gradient the clip cut, and k3 against the reference."""

    def __init__(self, eps: float, beta: float, norm: str, temperature: float):
        self.eps, self.beta, self.norm, self.temperature = eps, beta, norm, temperature

    def count(self, batch) -> torch.Tensor:
        completion = batch[1] != IGNORE  # (B, T)
        return completion.sum() if self.norm == "token" else completion.any(dim=1).sum()

    def loss_sum(self, model, batch) -> tuple:
        inputs, targets, advantages, old_logp, ref_logp = batch
        mask = (targets != IGNORE).float()  # (B, T) only completion tokens carry loss, hence gradient
        logp = completion_logprobs(model, inputs, targets, self.temperature)
        # One optimizer step per rollout: pi_old is this very policy, and rho = 1 exactly (TRL skips it too).
        old_logp = logp.detach() if old_logp is None else old_logp
        loss, cut = clipped_surrogate(logp, old_logp, advantages[:, None], self.eps)
        kl = k3(logp, ref_logp) * mask
        loss = loss + self.beta * kl
        weight = mask if self.norm == "token" else mask / mask.sum(dim=1, keepdim=True).clamp(min=1)
        return (loss * weight).sum(), {"clip_frac": (cut * weight).sum(), "kl": (kl * weight).sum()}


@torch.no_grad()
def rollout(model, reference, fmt, items: list, first: int, cfg: dict, device) -> tuple:
    """This rank's micro-batches for the next optimizer step(s), and the rollout's sums for the log.
    first: the stream position of items[0], which seeds the sampling (evaluate.sample)."""
    G, B, T = cfg["group_size"], cfg["batch_size"], cfg["temperature"]
    prompts = [fmt.encode(item["messages"], add_generation_prompt=True)[0] for item in items]
    groups = evaluate.sample(model, prompts, G, cfg["max_new_tokens"], T, cfg["top_k"], fmt.eot_id, cfg["seed"], 0, first)
    rewards = torch.tensor([[tasks.reward(evaluate.answer_text(fmt, o), item["answers"]) for o in group]
                            for group, item in zip(groups, items)])  # (P, G)
    advantages = group_advantages(rewards).flatten()  # (P G,) row order: group by group
    rows = [(p + o, [False] * len(p) + [True] * len(o)) for p, group in zip(prompts, groups) for o in group]
    batches = []
    for i in range(0, len(rows), B):
        inputs, targets = (t.to(device) for t in chat_data.collate(rows[i : i + B], fmt.eot_id))  # (b, T) each
        old = completion_logprobs(model, inputs, targets, T) if cfg["iterations"] > 1 else None
        batches.append((inputs, targets, advantages[i : i + B].to(device), old, completion_logprobs(reference, inputs, targets, T)))
    zero_signal = (rewards == rewards[:, :1]).all(dim=1).sum()  # groups with one reward for all: A = 0
    sums = [rewards.sum(), rewards.numel(), zero_signal, len(items), sum(len(o) for g in groups for o in g)]
    return batches, torch.tensor(sums, dtype=torch.float64, device=device)


class Rollouts:
    """fit's next_micro_batches: a fresh rollout every `iterations` steps, its micro-batches reused in between.
    A checkpoint between two rollouts holds the current one (train_state["rollout"], every rank's), so a
    resumed run continues on the same samples; one on a rollout boundary needs nothing: the next rollout
    depends only on the weights, the sampler's position and the seed."""

    def __init__(self, model, reference, fmt, items, sampler, cfg, run, autocast, step: int, train_state: dict, log):
        self.model, self.reference, self.fmt, self.items, self.sampler = model, reference, fmt, items, sampler
        self.cfg, self.run, self.autocast, self.step, self.train_state, self.log = cfg, run, autocast, step, train_state, log
        if step % cfg["iterations"]:  # resumed between two rollouts
            saved = train_state.get("rollout")
            if saved is None or len(saved) != run.world:
                raise config.TrainError(f"this checkpoint (step {step}) sits inside a rollout of --iterations {cfg['iterations']}: "
                                        f"resume it with the same number of processes ({len(saved or [])})")
            batches, self.figures = saved[run.rank]
            self.batches = [tuple(None if t is None else t.to(run.device) for t in b) for b in batches]

    def __call__(self) -> list:
        if self.step % self.cfg["iterations"] == 0:
            first = self.sampler.position + self.run.rank * self.sampler.B  # where this rank's prompts start
            items = [self.items[i] for i in self.sampler.next_ids()]
            with self.autocast:
                self.batches, sums = rollout(self.model, self.reference, self.fmt, items, first, self.cfg, self.run.device)
            if self.run.ddp:
                dist.all_reduce(sums)
            reward, n, zero, groups, length = sums.tolist()
            self.figures = {"reward": reward / n, "zero_signal": zero / groups, "completion_len": length / n}
            if self.cfg["iterations"] > 1:  # what a checkpoint inside this rollout must hold
                mine = ([tuple(None if t is None else t.cpu() for t in b) for b in self.batches], self.figures)
                everyone = [mine]
                if self.run.ddp:
                    everyone = [None] * self.run.world
                    dist.all_gather_object(everyone, mine)
                self.train_state["rollout"] = everyone
        self.step += 1
        self.log.rollouts[self.step] = self.figures
        return self.batches


def reinforce(cfg: dict, state: dict | None, run) -> dict:
    fmt, tokenizer_path, reference = grpo_config.load_base(cfg, run.device)  # frozen: pi_ref of the KL
    train_items, val_items, where = grpo_config.task_items(cfg, fmt, reference.config.max_seq_len)
    dtype, autocast = config.precision(cfg, run.device)
    torch.manual_seed(cfg["seed"])  # the same adapters' initialization on every rank
    model = copy.deepcopy(reference)  # the policy starts as the reference
    if state is not None and run.rank == state["source_rank"]:  # its disk holds the checkpoint
        model = grpo_config.load_trained(cfg, Path(cfg["out_dir"]) / "ckpt_latest", run.device, model)
    elif cfg["lora"]:
        lora.apply_lora(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_targets"].split(","))
    if state is not None:
        checkpoint.broadcast_weights(model, state["source_rank"], run)
    model.eval()  # no dropout, as the reference (load_base): pi_theta and pi_old are one function of the weights
    reference.requires_grad_(False)
    optimizer = train.make_optimizer(model, cfg["lr"], cfg["weight_decay"], run.device)
    step, best_val, position = (0, float("inf"), 0) if state is None else checkpoint.restore(state, optimizer, run)
    prompts_per_rank = cfg["batch_size"] * cfg["grad_accum"] // cfg["group_size"]
    sampler = data.RankSampler(data.WindowStream(len(train_items), cfg["seed"]), prompts_per_rank, run.rank, run.world, position)
    train_state = {"tokenizer_sha256": tokenizer_lib.tokenizer_sha256(tokenizer_path)}
    train_state.update({k: state[k] for k in ("before", "rollout") if state is not None and k in state})
    grpo_config.describe(cfg, run, model, dtype, train_items, val_items, where, prompts_per_rank)
    log = grpo_config.RolloutMetrics(Path(cfg["out_dir"]) / "metrics.jsonl", step, run.master)
    n = cfg["eval_samples"]

    def validate() -> dict:  # pass@1 from n samples per validation prompt; ckpt_best minimizes 1 - pass@1
        table = evaluate.score(model, fmt, val_items, n, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"], cfg["seed"], run)
        train_state.setdefault("before", torch.from_numpy(table))  # the base model's, for the paired comparison
        validate.table = table
        figures = {k: m for k, (m, _) in evaluate.summarize(table, n, (1, n)).items()}
        return {"val_loss": 1 - figures["pass@1"], **{f"val_{k}": v for k, v in figures.items()}}

    adapters_only = (lambda d: lora.save_adapters(model, d / lora.ADAPTER_FILE, cfg["base"])) if cfg["lora"] else None
    objective = ClippedObjective(cfg["clip_eps"], cfg["beta"], cfg["norm"], cfg["temperature"])
    rollouts = Rollouts(model, reference, fmt, train_items, sampler, cfg, run, autocast, step, train_state, log)
    result = train.fit(model, train.wrap_ddp(model, run), optimizer, rollouts, validate, cfg, run, log, (step, best_val, sampler),
                       train_state, autocast, write_weights=adapters_only, objective=objective)
    if result["finished"] and not hasattr(validate, "table"):  # a finished run resumed: nothing evaluated yet
        validate()  # on every rank: it all-reduces
    if not (result["finished"] and run.master):
        return {"step": result["step"]}
    summary = grpo_config.report(train_state["before"].numpy(), validate.table, n, where, cfg)
    best = lora.merge_lora(grpo_config.load_trained(cfg, Path(cfg["out_dir"]) / "ckpt_best", run.device))
    hf.export_hf(best, tokenizer_path, Path(cfg["out_dir"]) / "hf", chat_template=template.CHAT_TEMPLATE)
    print(f"best validation pass@1 {1 - result['best_val_loss']:.3f} (chosen on these prompts) in {Path(cfg['out_dir']) / 'ckpt_best'}; "
          f"chat with it: python 08_sft/chat.py --checkpoint {Path(cfg['out_dir']) / 'hf'}")
    return {"step": result["step"], **summary}


def main(argv=None) -> dict:
    return grpo_config.main(reinforce, argv)


if __name__ == "__main__":
    main()
