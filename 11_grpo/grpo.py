"""GRPO: a chat model samples answers, an exact checker scores them, the policy gradient raises what worked.

    rollout    per prompt q: G completions o_1..o_G ~ pi_old(. | q); rewards r_i = reward(o_i) in {0, 1} (data.py)
    advantage  A_i   = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)       the group is the baseline: no critic
    ratio      rho_t = pi_theta(o_t | q, o_<t) / pi_old(o_t | q, o_<t)        1 at the first step on a rollout
    loss       L     = (1/N) sum_i sum_t [ -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta k3_t ]
    k3         k3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1            >= 0; its mean estimates KL(pi_theta || pi_ref)

Group Relative Policy Optimization (Shao et al., 2024, arXiv:2402.03300), as DeepSeek-R1 trains with it. N counts
the completion tokens of the whole global batch (DAPO, arXiv:2503.14476); --norm sequence averages over each
completion's tokens first, as the GRPO paper writes it. A group whose rewards are all equal has A = 0: no gradient.
eps 0.2 and beta 0 are TRL's defaults; log-probs are those of softmax(logits / temperature), as in TRL. Each rank
rolls out its own prompts every --iterations steps (notes.md §2); the rest is lesson 07's stage with full weights
or lesson 08's LoRA. Measuring (pass@k), the closing report and the log: eval.py.

Commands (after lesson 08's SFT; the warm-up on the task's form first: notes.md §4; figures in BENCHMARKS.md):
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

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
tokenizer_lib = import_module("01_tokenizer.tokenizer")
hf = import_module("06_model.hf")
train = import_module("07_pretrain_ddp.train")  # the loop, the step, the optimizer, DDP
stage = import_module("07_pretrain_ddp.stage")  # flags, resolver, loading, launch
windows = import_module("07_pretrain_ddp.data")  # the epoch-shuffled sampler, here over prompts
checkpoint = import_module("07_pretrain_ddp.checkpoint")
template = import_module("08_sft.template")
lora = import_module("08_sft.lora")
sft = import_module("08_sft.sft")  # collate (rows -> inputs, targets) and target_logps
data = import_module("11_grpo.data")  # the task's prompts and its reward
evaluation = import_module("11_grpo.eval")  # seeded sampling, pass@k, the report, the log
IGNORE = train.IGNORE


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
    The clipped term wins the min only for rho > 1+eps with A > 0, or rho < 1-eps with A < 0: there it is a
    constant, and the token's gradient is 0."""
    ratio = torch.exp(logp - old_logp)
    loss = -torch.min(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)
    cut = ((ratio > 1 + eps) & (advantages > 0)) | ((ratio < 1 - eps) & (advantages < 0))
    return loss, cut


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
        logp = sft.target_logps(model, inputs, targets, self.temperature)
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
    first: the stream position of items[0], which seeds the sampling (eval.sample)."""
    G, B, T = cfg["group_size"], cfg["batch_size"], cfg["temperature"]
    prompts = [fmt.encode(item["messages"], add_generation_prompt=True)[0] for item in items]
    groups = evaluation.sample(model, prompts, G, cfg["max_new_tokens"], T, cfg["top_k"], fmt.eot_id, cfg["seed"], 0, first)
    rewards = torch.tensor([[data.reward(evaluation.answer_text(fmt, o), item["answers"]) for o in group]
                            for group, item in zip(groups, items)])  # (P, G)
    advantages = group_advantages(rewards).flatten()  # (P G,) row order: group by group
    rows = [(p + o, [False] * len(p) + [True] * len(o)) for p, group in zip(prompts, groups) for o in group]
    batches = []
    for i in range(0, len(rows), B):
        inputs, targets = (t.to(device) for t in sft.collate(rows[i : i + B], fmt.eot_id))  # (b, T) each
        old = sft.target_logps(model, inputs, targets, T) if cfg["iterations"] > 1 else None
        batches.append((inputs, targets, advantages[i : i + B].to(device), old, sft.target_logps(reference, inputs, targets, T)))
    zero_signal = (rewards == rewards[:, :1]).all(dim=1).sum()  # groups with one reward for all: A = 0
    sums = [rewards.sum(), rewards.numel(), zero_signal, len(items), sum(len(o) for g in groups for o in g)]
    return batches, torch.tensor(sums, dtype=torch.float64, device=device)


def rollouts(model, reference, fmt, items: list, sampler, cfg: dict, run, autocast, step: int, train_state: dict, log):
    """fit's micro-batches, one next() per optimizer step: a fresh rollout every `iterations` steps, reused in between.
    A checkpoint between two rollouts holds every rank's current one (train_state["rollout"]) for a resume; one on a
    rollout boundary needs nothing (notes.md §6)."""
    if step % cfg["iterations"]:  # resumed between two rollouts
        saved = train_state.get("rollout")
        if saved is None or len(saved) != run.world:
            raise stage.TrainError(f"this checkpoint (step {step}) sits inside a rollout of --iterations {cfg['iterations']}: "
                                   f"resume it with the same number of processes ({len(saved or [])})")
        batches, figures = saved[run.rank]
        batches = [tuple(None if t is None else t.to(run.device) for t in b) for b in batches]
    while True:
        if step % cfg["iterations"] == 0:
            first = sampler.position + run.rank * sampler.B  # where this rank's prompts start in the stream
            picked = [items[i] for i in sampler.next_ids()]
            with autocast:
                batches, sums = rollout(model, reference, fmt, picked, first, cfg, run.device)
            if run.ddp:
                dist.all_reduce(sums)
            reward, n, zero, groups, length = sums.tolist()
            figures = {"reward": reward / n, "zero_signal": zero / groups, "completion_len": length / n}
            if cfg["iterations"] > 1:  # what a checkpoint inside this rollout must hold
                mine = ([tuple(None if t is None else t.cpu() for t in b) for b in batches], figures)
                everyone = [mine] * run.world  # filled with every rank's under DDP
                if run.ddp:
                    dist.all_gather_object(everyone, mine)
                train_state["rollout"] = everyone
        step += 1
        log.rollouts[step] = figures
        yield batches


def reinforce(cfg: dict, state: dict | None, run) -> dict:
    # The base in eval mode (no dropout): pi_theta, pi_old and pi_ref are one function of the weights (TRL's disable_dropout).
    reference, tok, tokenizer_path = stage.load_base(cfg, run.device)
    fmt, reference = template.ChatFormat(tok), reference.eval()
    train_items, val_items, where = data.task_prompts(cfg, fmt, reference.config.max_seq_len)
    dtype, autocast = stage.precision(cfg, run.device)
    policy = copy.deepcopy(reference)  # the policy starts as the reference, which stays frozen: pi_ref of the KL
    adapt, load, write_weights = lora.hooks(cfg, policy)
    model = stage.start_model(cfg, state, run, policy, adapt, load).eval()
    reference.requires_grad_(False)
    optimizer = train.make_optimizer(model, cfg["lr"], cfg["weight_decay"], run.device, cfg["optimizer"], cfg["muon_lr"])
    step, best_val, position = checkpoint.restore(state, optimizer, run)
    per_rank = cfg["batch_size"] * cfg["grad_accum"] // cfg["group_size"]  # prompts per rank and step
    sampler = windows.RankSampler(windows.WindowStream(len(train_items), cfg["seed"]), per_rank, run.rank, run.world, position)
    train_state = {"tokenizer_sha256": tokenizer_lib.tokenizer_sha256(tokenizer_path)}
    train_state.update({k: state[k] for k in ("before", "rollout") if state is not None and k in state})
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stage.describe_run(cfg, run, model, [
        (f"base {cfg['base']}: {model.num_params():,} parameters, {n_train:,} trained ({'LoRA' if cfg['lora'] else 'full'}), "
         f"on {run.device} ({dtype}), {run.world} process(es)"),
        (f"prompts: {len(train_items):,} train, {len(val_items)} validation from {where}; each step: {per_rank} prompts x {cfg['group_size']} "
         f"completions x {run.world} processes, {cfg['iterations']} optimizer step(s) per rollout")], template.CHAT_TEMPLATE)
    log = evaluation.RolloutMetrics(Path(cfg["out_dir"]) / "metrics.jsonl", step, run.master)
    n = cfg["eval_samples"]

    def validate() -> dict:  # pass@1 from n samples per validation prompt; ckpt_best minimizes 1 - pass@1
        table = evaluation.score(model, fmt, val_items, n, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"], cfg["seed"], run)
        train_state.setdefault("before", torch.from_numpy(table))  # the base model's, for the paired comparison
        validate.table = table
        figures = {k: m for k, (m, _) in evaluation.summarize(table, n, (1, n)).items()}
        return {"val_loss": 1 - figures["pass@1"], **{f"val_{k}": v for k, v in figures.items()}}

    objective = ClippedObjective(cfg["clip_eps"], cfg["beta"], cfg["norm"], cfg["temperature"])
    stream = rollouts(model, reference, fmt, train_items, sampler, cfg, run, autocast, step, train_state, log)
    result = train.fit(model, train.wrap_ddp(model, run), optimizer, lambda: next(stream), validate, cfg, run, log, (step, best_val, sampler),
                       train_state, autocast, write_weights=write_weights, objective=objective)
    if result["finished"] and not hasattr(validate, "table"):  # a finished run resumed: nothing evaluated yet
        validate()  # on every rank: it all-reduces
    if not (result["finished"] and run.master):
        return {"step": result["step"], "finished": result["finished"]}
    summary = evaluation.report(train_state["before"].numpy(), validate.table, n, where, cfg["temperature"])
    out_dir = Path(cfg["out_dir"])
    best = checkpoint.load_model(out_dir / "ckpt_best", run.device)  # LoRA: merged onto the base, a plain LilLM
    hf.export_hf(best, tokenizer_path, out_dir / "hf", chat_template=template.CHAT_TEMPLATE)
    print(f"best validation pass@1 {1 - result['best_val_loss']:.3f} (chosen on these prompts) in {out_dir / 'ckpt_best'}; "
          f"chat with it: python 08_sft/chat.py --checkpoint {out_dir / 'hf'}")
    return {"step": result["step"], "finished": result["finished"], **summary}


DEFAULTS = dict(stage.POST_TRAINING, **evaluation.SAMPLING, base="out/sft/ckpt_best", task="choice", data_dir=data.DEFAULT_DIR,
                out_dir="out/grpo", **lora.LORA_DEFAULTS, group_size=8, batch_size=64, grad_accum=2, iterations=1, clip_eps=0.2,
                beta=0.0, norm="token", max_steps=100, warmup_steps=5)  # SAMPLING: 16 new tokens at temperature 1, 256 x 8 for pass@k


def parse_args(argv=None) -> dict:
    parser, flag = stage.make_parser("GRPO: reinforcement learning with a verifiable reward on a chat model.", {"default": DEFAULTS})
    stage.add_post_training_flags(flag, "lesson 08's SFT checkpoint (full or LoRA), a DPO one, or an export dir",
                                  '{"prompt" or "messages", "answer"} (give --val_data with it)', hub=False)
    flag("task", "the built-in speaker task: with four names in the prompt (choice) or without (open)", choices=data.FORMS)
    lora.add_lora_flags(flag)
    flag("group_size", "G: completions sampled per prompt; batch_size x grad_accum must be a multiple", type=int)
    stage.add_training_flags(flag)  # batch_size counts completions (rows); lr None: 3e-4 full, 1e-3 LoRA
    flag("iterations", "optimizer steps on each rollout (GRPO's mu); >1 makes the ratio leave 1 and the clip act", type=int)
    flag("max_new_tokens", "longest completion, in tokens", type=int)
    flag("temperature", "sampling temperature, also applied to the log-probs of the loss (as TRL)", type=float)
    flag("top_k", "sample among the k most likely tokens; 0: all (sampling then matches the policy exactly)", type=int)
    flag("clip_eps", "PPO's clip: the ratio's gradient stops outside [1 - eps, 1 + eps] on the side of the advantage", type=float)
    flag("beta", "weight of the k3 KL penalty to the frozen base; 0: none (the KL is still logged)", type=float)
    flag("norm", "token: every completion token of the batch weighs the same (DAPO); sequence: mean per completion, "
         "then over completions (the GRPO paper)", choices=["token", "sequence"])
    flag("eval_prompts", "validation prompts (spread evenly over the validation file)", type=int)
    flag("eval_samples", "n: samples per validation prompt, for pass@1 and pass@n", type=int)
    return vars(parser.parse_args(argv))


def resolve_config(given: dict, saved: dict | None = None) -> dict:
    cfg = stage.resolve(given, lora.with_lr(DEFAULTS, given, 3e-4), saved, lora.SHAPE,
                        ("iterations", "max_new_tokens", "eval_samples", "lora_rank"))
    rows = cfg["batch_size"] * cfg["grad_accum"]
    if cfg["group_size"] < 2 or rows % cfg["group_size"]:
        raise stage.TrainError(f"--group_size {cfg['group_size']}: need at least 2 (a group is its own baseline) and a divisor "
                               f"of batch_size x grad_accum = {rows} completions per process and step")
    if not 0 < cfg["clip_eps"] < 1 or cfg["beta"] < 0 or cfg["temperature"] <= 0 or cfg["top_k"] < 0 or cfg["eval_prompts"] < 2:
        raise stage.TrainError(f"need 0 < clip_eps < 1, beta >= 0, temperature > 0, top_k >= 0, eval_prompts >= 2; got "
                               f"{cfg['clip_eps']}, {cfg['beta']}, {cfg['temperature']}, {cfg['top_k']}, {cfg['eval_prompts']}")
    if bool(cfg["data"]) != bool(cfg["val_data"]):
        raise stage.TrainError("give --data and --val_data together: pass@1 is measured on prompts held out of training")
    return cfg


def build(cfg: dict) -> None:  # the built-in task's files, when no --data is given
    if not cfg["data"]:
        data.task_files(cfg["data_dir"], cfg["task"])


def main(argv=None) -> dict:
    return stage.main(parse_args(argv), resolve_config, build, reinforce)


if __name__ == "__main__":
    main()
