"""Lesson 11's plumbing: its flags on lesson 07's resolver, the models it loads, the task's prompts, the log.

    metrics.jsonl   lesson 07's record per step (loss: the clipped surrogate; clip_frac and kl per token),
                    joined with the rollout's reward, zero_signal (share of groups with one reward for all)
                    and completion_len (tokens, </s> included); val_pass@1, val_pass@G, val_greedy at evaluations
    grpo.png        mean reward per step and validation pass@1; completion length per step

Demo: python 11_grpo/config.py --help
"""

import sys
from importlib import import_module
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
tokenizer_lib = import_module("01_tokenizer.tokenizer")
config = import_module("07_pretrain_ddp.config")  # make_parser, resolve, launch, one_line_errors
checkpoint = import_module("07_pretrain_ddp.checkpoint")
metrics = import_module("07_pretrain_ddp.metrics")
template = import_module("08_sft.template")
lora = import_module("08_sft.lora")
sft = import_module("08_sft.sft")  # the LoRA flags every stage shares
chat = import_module("08_sft.chat")  # load_chat_model: a full or LoRA SFT checkpoint, or an export
tasks = import_module("11_grpo.tasks")
evaluate = import_module("11_grpo.evaluate")
plt = metrics.plt  # matplotlib, headless

DEFAULTS = dict(
    base="out/sft/ckpt_best", tokenizer=None, task="choice", data=None, val_data=None, data_dir=tasks.DEFAULT_DIR,
    out_dir="out/grpo", **sft.LORA_DEFAULTS,
    group_size=8, batch_size=64, grad_accum=2, iterations=1, max_new_tokens=16, temperature=1.0, top_k=0,
    clip_eps=0.2, beta=0.0, norm="token",
    max_steps=100, lr=None, min_lr=None, warmup_steps=5, weight_decay=0.0, grad_clip=1.0,
    eval_interval=50, log_interval=10, eval_prompts=256, eval_samples=8, seed=1337, device="auto", dtype="auto",
    stop_at=0, resume=False, dist_timeout=30.0,
)
SHAPE = sft.SHAPE  # what a resumed run may not change


def parse_args(argv=None) -> dict:
    parser, flag = config.make_parser("GRPO: reinforcement learning with a verifiable reward on a chat model.", {"default": DEFAULTS})
    flag("base", "the model to improve: lesson 08's SFT checkpoint (full or LoRA), a DPO one, or an export dir")
    flag("tokenizer", "tokenizer.json (None: beside the base, else data/tokenizer.json; checked against the base's sha256)")
    flag("task", "the built-in speaker task: with four names in the prompt (choice) or without (open)", choices=tasks.FORMS)
    flag("data", "your own training prompts: JSONL of {\"prompt\" or \"messages\", \"answer\"} (needs --val_data)")
    flag("val_data", "your own validation prompts, the same format")
    flag("data_dir", "where the built-in task is written (tasks.py)")
    sft.add_lora_flags(flag, "the frozen base")
    flag("group_size", "G: completions sampled per prompt; batch_size x grad_accum must be a multiple", type=int)
    config.add_training_flags(flag)  # batch_size counts completions (rows); lr None: 3e-4 full, 1e-3 LoRA
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
    cfg = config.resolve(given, sft.with_lr(DEFAULTS, given, 3e-4), saved, SHAPE,
                         ("iterations", "max_new_tokens", "eval_samples", "lora_rank"))
    rows = cfg["batch_size"] * cfg["grad_accum"]
    if cfg["group_size"] < 2 or rows % cfg["group_size"]:
        raise config.TrainError(f"--group_size {cfg['group_size']}: need at least 2 (a group is its own baseline) and a divisor "
                                f"of batch_size x grad_accum = {rows} completions per process and step")
    if not 0 < cfg["clip_eps"] < 1 or cfg["beta"] < 0 or cfg["temperature"] <= 0 or cfg["top_k"] < 0 or cfg["eval_prompts"] < 2:
        raise config.TrainError(f"need 0 < clip_eps < 1, beta >= 0, temperature > 0, top_k >= 0, eval_prompts >= 2; got "
                                f"{cfg['clip_eps']}, {cfg['beta']}, {cfg['temperature']}, {cfg['top_k']}, {cfg['eval_prompts']}")
    if bool(cfg["data"]) != bool(cfg["val_data"]):
        raise config.TrainError("give --data and --val_data together: pass@1 is measured on prompts held out of training")
    return cfg


def main(stage, argv=None) -> dict:
    """Flags -> config -> the stage, with lesson 07's one-line errors (exit code 2) for bad input."""
    with config.one_line_errors():
        return config.launch(parse_args(argv), resolve_config, build_task, stage)


def build_task(cfg: dict) -> None:
    """The built-in task's files, when no --data is given (run through lesson 07's build_once)."""
    if not cfg["data"]:
        tasks.default_data(cfg["data_dir"], cfg["task"])


def load_base(cfg: dict, device) -> tuple:
    """(ChatFormat, tokenizer path, the base model in eval mode: no dropout, so that pi_old, pi_theta and pi_ref are
    one function of the weights, as TRL's disable_dropout), the tokenizer checked against the base's record."""
    tokenizer_path = template.find_tokenizer(cfg["base"], cfg["tokenizer"])
    model = chat.load_chat_model(cfg["base"], device=device)  # its FileNotFoundError says how to make one
    fmt = template.ChatFormat(tokenizer_lib.load_tokenizer(tokenizer_path))
    if (Path(cfg["base"]) / checkpoint.STATE_FILE).is_file():  # lessons 07 and 08 record the tokenizer's sha256
        expected = checkpoint.load_state(cfg["base"])["tokenizer_sha256"]
        if expected != tokenizer_lib.tokenizer_sha256(tokenizer_path):
            raise config.TrainError(f"{tokenizer_path} is not the tokenizer {cfg['base']} was trained with "
                                    f"(sha256 {expected[:12]}); pass that one with --tokenizer")
    if fmt.tokenizer.get_vocab_size() > model.config.vocab_size:
        raise config.TrainError(f"{tokenizer_path} has {fmt.tokenizer.get_vocab_size()} tokens, more than the base's {model.config.vocab_size}")
    return fmt, tokenizer_path, model.eval()


def load_trained(cfg: dict, ckpt_dir: Path, device, base=None):
    """The policy of a checkpoint: its weights, or the base (loaded unless given) with its adapters, unmerged."""
    path = checkpoint.find(ckpt_dir)
    if path is None:
        raise checkpoint.CheckpointError(f"no checkpoint at {ckpt_dir}; start a new run without --resume")
    if not cfg["lora"]:
        return checkpoint.load_model(path, device).eval()
    return lora.load_adapters(base if base is not None else load_base(cfg, device)[2], path).eval()


def task_items(cfg: dict, fmt, max_len: int) -> tuple:
    """(train prompts, the fixed validation prompts, the validation file's name); prompts too long to leave
    max_new_tokens inside the model's window are dropped."""
    train_path, val_path = (cfg["data"], cfg["val_data"]) if cfg["data"] else tasks.default_data(cfg["data_dir"], cfg["task"])
    fits = lambda item: len(fmt.encode(item["messages"], add_generation_prompt=True)[0]) + cfg["max_new_tokens"] <= max_len  # noqa: E731
    train = [item for item in tasks.read_prompts(train_path) if fits(item)]
    val = [item for item in evaluate.eval_items(val_path, cfg["eval_prompts"]) if fits(item)]
    if len(train) < cfg["batch_size"] * cfg["grad_accum"] // cfg["group_size"] or len(val) < 2:
        raise tasks.DataError(f"{len(train)} train and {len(val)} validation prompts fit max_seq_len {max_len} with room for "
                              f"{cfg['max_new_tokens']} new tokens: too few; fix: shorter prompts or a lower --max_new_tokens")
    return train, val, Path(val_path).name


def describe(cfg: dict, run, model, dtype: str, train: list, val: list, where: str, prompts_per_rank: int) -> None:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics.describe_run(cfg, run, model, [
        f"base {cfg['base']}: {model.num_params():,} parameters, {n_train:,} trained ({'LoRA' if cfg['lora'] else 'full'}), "
        f"on {run.device} ({dtype}), {run.world} process(es)",
        f"prompts: {len(train):,} train, {len(val)} validation from {where}; each step: {prompts_per_rank} prompts x "
        f"{cfg['group_size']} completions x {run.world} processes, {cfg['iterations']} optimizer step(s) per rollout"])


def report(before: np.ndarray, after: np.ndarray, n: int, where: str, cfg: dict) -> dict:
    """Print and return pass@1, pass@n and greedy accuracy before and after, with the paired differences."""
    summary = {"before": evaluate.summarize(before, n, (1, n)), "after": evaluate.summarize(after, n, (1, n)), "difference": {}}
    per_prompt = lambda t, k: np.array([evaluate.pass_at_k(n, int(c), k) for c in t[:, 0]]) if k else t[:, 1]  # noqa: E731
    print(f"validation: {len(after)} prompts of {where}, {n} samples each at temperature {cfg['temperature']} (95% intervals)")
    for name, k in (("pass@1", 1), (f"pass@{n}", n), ("greedy", 0)):
        if name in summary["after"]:
            d = summary["difference"][name] = evaluate.interval(per_prompt(after, k) - per_prompt(before, k))
            (b, hb), (a, ha) = summary["before"][name], summary["after"][name]
            print(f"  {name:<8} base {b:.3f} +- {hb:.3f} -> trained {a:.3f} +- {ha:.3f}   paired difference {d[0]:+.3f} +- {d[1]:.3f}")
    return summary


class RolloutMetrics(metrics.Metrics):
    """Lesson 07's metrics.jsonl, each step's record joined with the figures of the rollout it trained on."""

    def __init__(self, path: Path, start_step: int, master: bool):
        super().__init__(path, start_step, master)
        self.rollouts = {}  # step -> {"reward", "zero_signal", "completion_len"}, filled by grpo.Rollouts

    def write(self, record: dict) -> None:
        super().write({**record, **self.rollouts.pop(record["step"], {})})

    def progress(self, record: dict, max_steps: int) -> None:
        if self.master:
            r = {**record, **self.rollouts.get(record["step"], {})}
            print(f"step {r['step']}/{max_steps} | reward {r['reward']:.3f} | zero-signal groups {100 * r['zero_signal']:.0f}% | "
                  f"length {r['completion_len']:.1f} | clipped {100 * r['clip_frac']:.1f}% | kl {r['kl']:.4f} | "
                  f"loss {r['loss']:+.4f} | lr {r['lr']:.2e} | {r['tokens_per_s']:,.0f} tok/s")

    def plot(self, path: Path, what: str = "loss") -> None:
        path = Path(path).with_name("grpo.png")
        steps = [r for r in self.records if "reward" in r]
        val = [(r["step"], r["val_pass@1"]) for r in self.records if "val_pass@1" in r]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), dpi=100, sharex=True)
        if steps:
            top.plot([r["step"] for r in steps], [r["reward"] for r in steps], color="tab:blue", alpha=0.6, label="mean reward (train rollouts)")
            bottom.plot([r["step"] for r in steps], [r["completion_len"] for r in steps], color="tab:green")
        if val:
            top.plot(*zip(*val), color="tab:red", marker="o", label="validation pass@1")
        top.set_ylabel("reward / pass@1")
        top.legend()
        bottom.set_ylabel("completion length (tokens)")
        bottom.set_xlabel("optimizer step")
        for ax in (top, bottom):
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        print(f"wrote {path}: reward and validation pass@1, completion length, against optimizer steps")


if __name__ == "__main__":
    with config.one_line_errors():
        print(resolve_config(parse_args()))
