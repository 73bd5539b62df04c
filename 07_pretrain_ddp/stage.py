"""What every training stage shares: flags, presets, the config resolver, process setup, launch, one-line errors.

    flags given on the command line  >  the checkpoint's config (with --resume)  >  the stage's defaults

A stage (pretraining in train.py; SFT, DPO and GRPO in lessons 08, 10, 11) declares its defaults, its own
flags, how to build its data and what to run, and calls `main`: the command line becomes a checked config,
missing data is built before any process group exists (one builder per filesystem, under a file lock, so a
build of hours meets no collective's timeout), then the stage runs inside torchrun's process group, resumed
from the newest checkpoint any node holds. Every problem a user can fix is one line on stderr, exit code 2.

Demo: python 07_pretrain_ddp/stage.py --help
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from importlib import import_module
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
commands = import_module("01_tokenizer.commands")
shards = import_module("01_tokenizer.shards")  # its flock: one builder per filesystem
lillm = import_module("06_model.model")
weights = import_module("06_model.weights")
checkpoint = import_module("07_pretrain_ddp.checkpoint")


class TrainError(Exception):
    """Bad input that the user can fix: printed as one line, `error: ...`."""


# ---- defaults: the shared loop's, pretraining's presets, post-training's ------------------------------------

TRAINING = dict(  # the flags of train.fit, the same in every stage; a stage overrides what it needs
    optimizer="adamw", muon_lr=None, grad_accum=1, lr=None, min_lr=None, weight_decay=0.0, grad_clip=1.0, eval_interval=50, log_interval=10,
    seed=1337, device="auto", dtype="auto", stop_at=0, resume=False, dist_timeout=30.0,
)
MODEL_FIELDS = ("d_model", "n_layers", "q_heads", "kv_heads", "max_seq_len", "multiple_of", "dropout")
FROZEN = (*MODEL_FIELDS, "optimizer")  # a resumed run keeps its model and its optimizer's state
FULL = dict(TRAINING,  # the seed's recipe: the 39.6M model, 524,288 tokens per step, ~10B tokens of OpenWebText
    corpus="openwebtext", data_dir="data/openwebtext", tokenizer="data/openwebtext/tokenizer.json", out_dir="out",
    d_model=512, n_layers=12, q_heads=16, kv_heads=8, max_seq_len=512, multiple_of=128, dropout=0.0,
    batch_size=32, global_batch_tokens=524288, max_steps=20000,
    lr=6e-4, min_lr=6e-5, warmup_steps=715,  # warmup: GPT-3's 375M tokens
    weight_decay=0.1, eval_interval=250, eval_tokens=2**20, compile=True, peak_tflops=0.0,
    optimizer="muon",  # Muon for the blocks' matrices at --lr (its scale carries AdamW's rate over): BENCHMARKS.md
    wandb=False, wandb_project="lillm", sample_tokens=200, prompt="", dry_run=False,
)
PRESETS = {
    "cpu": dict(FULL, corpus="shakespeare", data_dir="data/shakespeare", tokenizer="data/tokenizer.json",
                d_model=192, n_layers=4, q_heads=6, kv_heads=3, max_seq_len=256, multiple_of=64,
                batch_size=8, global_batch_tokens=0, max_steps=900, lr=2e-3, min_lr=2e-4, warmup_steps=30,
                eval_interval=150, eval_tokens=2**15, compile=False),
    "full": FULL,
}
DRY_RUN = dict(  # --dry_run: a tiny model for a few steps, with the preset's dtype, compile, optimizer and batch arithmetic
    d_model=64, n_layers=2, q_heads=4, kv_heads=2, max_seq_len=64, multiple_of=32, batch_size=2, max_steps=3,
    warmup_steps=1, eval_interval=3, eval_tokens=256, log_interval=1, sample_tokens=8, dtype="bfloat16",
)
POST_TRAINING = dict(TRAINING, tokenizer=None, data=None, val_data=None)  # lessons 08, 10, 11: a --base, JSONL data
HUB = dict(hf_dataset=None, hf_split="train", hf_limit=0, val_fraction=0.05)  # ... or a hub dataset (08, 10)
PER_INVOCATION = ("resume", "stop_at", "dry_run")  # belong to one command, not to the run: never taken from a checkpoint


# ---- flags ---------------------------------------------------------------------------------------------------

def make_parser(description: str, defaults: dict):
    """(parser, flag): every flag's help shows its default in each preset; unset flags stay absent."""
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help="continue OUT_DIR/ckpt_latest with its saved config; flags given override it")

    def flag(name, help, **kw):
        values = {str(v[name]) for v in defaults.values()}
        shown = f"default {values.pop()}" if len(values) == 1 else ", ".join(f"{k}: {v[name]}" for k, v in defaults.items())
        parser.add_argument(f"--{name}", help=f"{help} [{shown}]", **kw)

    return parser, flag


def add_training_flags(flag) -> None:
    """The flags of the shared loop (train.fit), the same in every stage."""
    flag("out_dir", "checkpoints (ckpt_latest/, ckpt_best/), config.json, metrics.jsonl, loss.png")
    flag("batch_size", "micro-batch: rows per process per forward pass", type=int)
    flag("grad_accum", "micro-steps per optimizer step", type=int)
    flag("max_steps", "optimizer steps; the learning rate reaches min_lr at the last one", type=int)
    flag("optimizer", "adamw, or muon: Muon (muon.py) for the matrices of attention and FFN, AdamW for the rest",
         choices=["adamw", "muon"])
    flag("lr", "peak learning rate (AdamW's; Muon's too unless --muon_lr)", type=float)
    flag("muon_lr", "Muon's peak learning rate, on its schedule; None: --lr (Muon scales it to AdamW's update size)", type=float)
    flag("min_lr", "final learning rate (cosine decay ends here at max_steps)", type=float)
    flag("warmup_steps", "linear warmup steps", type=int)
    flag("weight_decay", "AdamW weight decay, on weight matrices only", type=float)
    flag("grad_clip", "clip the gradient's global norm to this; 0: no clipping", type=float)
    flag("eval_interval", "evaluate (all ranks) and checkpoint every this many steps", type=int)
    flag("log_interval", "print progress, write metrics.jsonl and act on stop signals every this many steps", type=int)
    flag("seed", "seed for the initialization, the data order and dropout", type=int)
    flag("device", "auto: cuda:LOCAL_RANK if there is a GPU, else cpu", choices=["auto", "cpu", "cuda"])
    flag("dtype", "auto: bfloat16 autocast on GPU, float32 on CPU", choices=["auto", "float32", "bfloat16"])
    flag("stop_at", "save and exit at this step as on SIGTERM, the schedule still ending at max_steps (job slots); 0: off", type=int)
    flag("dist_timeout", "minutes a rank waits for the others in a collective before the run fails", type=float)


def add_post_training_flags(flag, base: str, data: str, hub: bool = True) -> None:
    """The flags of a stage that starts from a --base model and reads JSONL data (lessons 08, 10, 11); with hub, the
    HUB flags too (a dataset on the Hugging Face hub, or a held-out share of --data for validation)."""
    flag("base", f"the model to start from: {base}")
    flag("tokenizer", "tokenizer.json (None: beside the base, else data/tokenizer.json; checked against the base's record)")
    flag("data", f"training data: JSONL files of {data} (None: the offline set)", nargs="+")
    flag("val_data", "validation data, the same format" + (" (None: a fixed val_fraction of --data or of the hub split)"
                                                             if hub else " (needed with --data)"), nargs="+")
    flag("data_dir", "where the offline set is written")
    if hub:
        flag("hf_dataset", "a Hugging Face dataset in that format, instead of --data (needs the hub)")
        flag("hf_split", "its split")
        flag("hf_limit", "read at most this many hub rows; 0: all", type=int)
        flag("val_fraction", "share held out when no --val_data is given (lesson 01's crc32 rule)", type=float)


def pretrain_flags(argv=None) -> dict:
    """Pretraining's flags; only those given on the command line end up in the dict."""
    parser, flag = make_parser("Pretrain LilLM with DistributedDataParallel (python or torchrun).", PRESETS)
    parser.add_argument("--preset", choices=PRESETS, help="defaults for every flag below [full on a GPU, else cpu]")
    flag("corpus", "corpus for lesson 01 to tokenize when DATA_DIR has no token files")
    flag("data_dir", "directory with train.bin, val.bin, meta.json (built by lesson 01 if missing)")
    flag("tokenizer", "tokenizer.json the token files were made with (checked by sha256)")
    for name, kind, what in [("d_model", int, "model width"), ("n_layers", int, "transformer blocks"),
                             ("q_heads", int, "query heads"), ("kv_heads", int, "key/value heads (GQA)"),
                             ("max_seq_len", int, "tokens per training window = the model's context"),
                             ("multiple_of", int, "SwiGLU hidden size is rounded up to this"), ("dropout", float, "dropout rate")]:
        flag(name, f"model: {what}", type=kind)
    add_training_flags(flag)
    flag("global_batch_tokens", "tokens per optimizer step; grad_accum = this / (batch_size x max_seq_len x world_size); "
         "0: use --grad_accum", type=int)
    flag("eval_tokens", "validation tokens per evaluation, in windows spread over val.bin (all of it if fewer)", type=int)
    flag("compile", "torch.compile the model", action=argparse.BooleanOptionalAction)
    flag("peak_tflops", "peak TFLOP/s of one process's device, for MFU; 0: known GPUs, or measured on CPU", type=float)
    flag("wandb", "log to Weights & Biases (imported only then)", action=argparse.BooleanOptionalAction)
    flag("wandb_project", "Weights & Biases project")
    flag("sample_tokens", "tokens to generate from the trained model at the end; 0: none", type=int)
    flag("prompt", "text the end-of-run sample continues (after </s>, i.e. at a document start)")
    parser.add_argument("--dry_run", action="store_true", help="check the preset's whole code path (bf16 autocast, compile, "
                        "fused AdamW, the global batch) on a tiny model for 3 steps, into OUT_DIR/dry_run; runs on a CPU too")
    return vars(parser.parse_args(argv))


# ---- the resolver ---------------------------------------------------------------------------------------------

def resolve(given: dict, defaults: dict, saved: dict | None, frozen: tuple, positive: tuple = ()) -> dict:
    """Flags given > the checkpoint's config > defaults, then the checks every stage needs.
    frozen: flags a resumed run may not change (the model's shape); positive: the stage's own >= 1 flags."""
    if saved is None:
        cfg = dict(defaults)
    else:
        changed = [f"--{k} {given[k]} (checkpoint: {saved.get(k, TRAINING.get(k))})" for k in frozen
                   if k in given and given[k] != saved.get(k, TRAINING.get(k))]
        if changed:
            raise TrainError(f"--resume with a different model config or optimizer: {', '.join(changed)}")
        cfg = dict(saved)
    cfg.update({k: defaults[k] for k in PER_INVOCATION if k in defaults}, **given)
    cfg.setdefault("optimizer", "adamw"), cfg.setdefault("muon_lr", None)  # checkpoints from before Muon
    for k in ("batch_size", "grad_accum", "max_steps", "eval_interval", "log_interval", *positive):
        if cfg[k] < 1:
            raise TrainError(f"--{k} {cfg[k]}: must be at least 1")
    if cfg["dist_timeout"] <= 0:
        raise TrainError(f"--dist_timeout {cfg['dist_timeout']}: must be positive (minutes)")
    for k in ("weight_decay", "grad_clip", "stop_at"):
        if cfg[k] < 0:
            raise TrainError(f"--{k} {cfg[k]}: must not be negative")
    if cfg.get("muon_lr") is not None and cfg["muon_lr"] <= 0:
        raise TrainError(f"--muon_lr {cfg['muon_lr']}: must be positive")
    if not 0 < cfg["min_lr"] <= cfg["lr"] or not 0 <= cfg["warmup_steps"] < cfg["max_steps"]:
        raise TrainError(f"need 0 < min_lr <= lr and 0 <= warmup_steps < max_steps, got min_lr {cfg['min_lr']}, "
                         f"lr {cfg['lr']}, warmup_steps {cfg['warmup_steps']}, max_steps {cfg['max_steps']}")
    if cfg.get("data") and cfg.get("hf_dataset"):
        raise TrainError("give --data or --hf_dataset, not both")
    return cfg


def pretrain_config(given: dict, saved: dict | None = None) -> dict:
    """Pretraining's config: resolve() over the preset (a resumed run keeps its preset)."""
    preset = given.get("preset") or (saved or {}).get("preset")
    preset = preset or ("full" if torch.cuda.is_available() and given.get("device") != "cpu" else "cpu")
    if saved is not None and preset != saved["preset"]:
        raise TrainError(f"--preset {preset} differs from the checkpoint's {saved['preset']}; a resumed run keeps its preset")
    if "grad_accum" in given and given.get("global_batch_tokens"):
        raise TrainError("give --grad_accum or --global_batch_tokens, not both")
    given = {k: v for k, v in given.items() if k != "preset"}
    if "grad_accum" in given:
        given["global_batch_tokens"] = 0  # an explicit accumulation count replaces the preset's global batch
    if given.get("dry_run"):  # the preset's code path at a size that runs in a minute (flags given still win)
        world = int(os.environ.get("WORLD_SIZE", 1))
        out_dir = Path(given.get("out_dir", PRESETS[preset]["out_dir"])) / "dry_run"
        given = {**DRY_RUN, "global_batch_tokens": DRY_RUN["batch_size"] * DRY_RUN["max_seq_len"] * world * 2, **given,
                 "out_dir": str(out_dir)}
    cfg = resolve(given, dict(PRESETS[preset], preset=preset), saved, FROZEN, ("eval_tokens",))
    if cfg["preset"] == "full" and cfg["device"] == "auto" and not cfg["dry_run"] and not torch.cuda.is_available():
        raise TrainError("the full preset is the seed's GPU recipe (524,288 tokens per step: hours per step on a CPU) and "
                         "torch sees no GPU; use --preset cpu, add --dry_run to check its code path in a minute, "
                         "or pass --device cpu to run it here anyway")
    for k in ("global_batch_tokens", "sample_tokens", "peak_tflops"):
        if cfg[k] < 0:
            raise TrainError(f"--{k} {cfg[k]}: must not be negative")
    return cfg


def set_grad_accum(cfg: dict, world: int) -> int:
    """A fixed global batch: the micro-steps make up for fewer processes (grad_accum = tokens / (B T W))."""
    B, T, tokens = cfg["batch_size"], cfg["max_seq_len"], cfg["global_batch_tokens"]
    if tokens and tokens % (B * T * world):
        raise TrainError(f"--global_batch_tokens {tokens:,} is not a multiple of batch_size {B} x max_seq_len {T} x "
                         f"world_size {world} = {B * T * world:,}; change --batch_size or the number of processes")
    if tokens:
        cfg["grad_accum"] = tokens // (B * T * world)
    return cfg["grad_accum"]


def model_config(cfg: dict, vocab_size: int):
    """The ModelConfig of a run: the token files' vocabulary, the shape flags; a TrainError if invalid."""
    try:
        return lillm.ModelConfig(vocab_size=vocab_size, **{k: cfg[k] for k in MODEL_FIELDS})
    except ValueError as e:
        raise TrainError(f"invalid model config: {e}") from None


def precision(cfg: dict, device: torch.device) -> tuple:
    """(dtype name, the context forward passes run in): bfloat16 autocast on a GPU by default, else float32."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # float32 matmuls outside autocast may use TF32 tensor cores
    dtype = cfg["dtype"] if cfg["dtype"] != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    return dtype, torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


# ---- processes -----------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Where this process stands: torchrun's RANK / LOCAL_RANK / WORLD_SIZE, or one process alone."""
    ddp: bool
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def master(self) -> bool:  # rank 0 alone prints, logs and writes files
        return self.rank == 0


@contextmanager
def distributed(device_flag: str, timeout_minutes: float = 30):
    """The Run of this process; under torchrun, inside a process group that is destroyed on the way out.
    timeout_minutes bounds every collective: how long a rank waits for the others (NCCL's default is 10)."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda, but torch sees no GPU (a CPU build of torch, or no driver)")
    use_cuda = device_flag != "cpu" and torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if ddp:
        if use_cuda:
            torch.cuda.set_device(device)
        # NCCL moves GPU tensors over NVLink/InfiniBand; Gloo moves CPU tensors over TCP.
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
                                timeout=timedelta(minutes=timeout_minutes))
    try:
        yield Run(ddp, rank, local_rank, world, device)
        if ddp:  # leave together: a rank that tears the group down while another still uses it can abort (Gloo)
            dist.barrier()
    finally:
        if ddp:
            dist.destroy_process_group()


def build_once(directory, build) -> None:
    """build() under an exclusive lock on directory/.build.lock. Every process calls it before the process
    group exists: of those that share a filesystem (a node's ranks, or every node's on a shared one) the first
    builds and the others, once they hold the lock, find the files there (build must skip what exists). No
    collective waits meanwhile, so no timeout applies; the lock dies with its holder, never left stale."""
    with shards.locked(Path(directory) / ".build.lock", f"another process building {directory}"):
        build()


# ---- launch --------------------------------------------------------------------------------------------------

def start(given: dict, resolve_fn) -> tuple:
    """(config, train state or None) of this process, before any process group exists. A fresh run never
    writes over an existing one. With --resume, a process whose disk holds OUT_DIR/ckpt_latest reads it; one
    under torchrun whose disk does not (another node's) starts from the flags and gets the state in launch."""
    cfg = resolve_fn(given)
    latest = Path(cfg["out_dir"]) / "ckpt_latest"
    if cfg.get("dry_run"):  # its own directory, OUT_DIR/dry_run: each dry run starts afresh
        shutil.rmtree(cfg["out_dir"], ignore_errors=True)
    if not given.get("resume"):
        if checkpoint.find(latest) or checkpoint.find(latest.with_name("ckpt_best")):
            raise TrainError(f"{cfg['out_dir']} already holds a checkpoint: pass --resume to continue it, or another --out_dir")
        return cfg, None
    if "RANK" not in os.environ or checkpoint.find(latest):
        state = checkpoint.load_state(latest)  # one process alone: its CheckpointError says what is missing
        return resolve_fn(given, state["config"]), state
    return cfg, None


def main(given: dict, resolve_fn, build, stage):
    """What every stage runs: its config; build(cfg) under build_once, before any process group; then the stage,
    inside the process group, with the train state when resuming: stage(cfg, state, run) -> {"finished": ...,
    figures}, which rank 0 also writes to OUT_DIR/summary.json (the pipeline's report card reads it). Bad input
    becomes one line on stderr (`error: ...`) and exit code 2, never a traceback."""
    with one_line_errors():
        cfg, state = start(given, resolve_fn)
        build_once(cfg["data_dir"], lambda: build(cfg))
        with distributed(cfg["device"], cfg["dist_timeout"]) as run:
            if given.get("resume"):
                state = checkpoint.broadcast_state(state, run)  # the newest checkpoint any node holds
                cfg = resolve_fn(given, state["config"])
            result = stage(cfg, state, run)
            if run.master:
                with commands.atomic_write(Path(cfg["out_dir"]) / "summary.json") as tmp:
                    tmp.write_text(json.dumps(result, indent=2, default=float) + "\n")
            return result


def one_line_errors():
    """Lesson 01's one-line errors (exit code 2), with the trainer's own error classes."""
    return commands.one_line_errors(TrainError, checkpoint.CheckpointError)


def start_model(cfg: dict, state: dict | None, run, model, adapt=None, load=None):
    """The model a run trains, the same on every rank: `model` with `adapt(model)` applied (lesson 08's LoRA
    adapters), or, resuming, its checkpoint, read by the rank whose disk holds it (load(ckpt_dir, model); default:
    the saved weights) and sent to every rank. Nodes need not share a disk."""
    torch.manual_seed(cfg["seed"])  # the same initialization (LoRA's A) on every rank
    if state is not None and run.rank == state["source_rank"]:
        latest = Path(cfg["out_dir"]) / "ckpt_latest"
        model = load(latest, model) if load else checkpoint.load_model(latest, run.device)
    elif adapt:
        adapt(model)
    if state is not None:
        checkpoint.broadcast_weights(model, state["source_rank"], run)
    torch.manual_seed(cfg["seed"] + run.rank)  # different dropout masks per rank
    return model


def load_base(cfg: dict, device) -> tuple:
    """(model, tokenizer, tokenizer path) of --base: lesson 06's one loader and its tokenizer checks."""
    try:
        return weights.load_pair(cfg["base"], cfg["tokenizer"], device)
    except ValueError as e:
        raise TrainError(str(e)) from None


def git_revision() -> str:
    try:
        run = lambda *cmd: subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
        return run("rev-parse", "--short", "HEAD") + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout or no commit)"


def describe_run(cfg: dict, run, model, lines: list[str], chat_template: str | None = None) -> None:
    """Rank 0 prints the resolved config, the git revision and the stage's lines, and writes config.json (and a
    chat model's chat_template.jinja, which lesson 06's exports and loaders look for beside the checkpoints)."""
    if run.master:
        revision = git_revision()
        print(f"config: {json.dumps(cfg, sort_keys=True)}\ngit revision: {revision}", *lines, sep="\n")
        out = Path(cfg["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        saved = dict(cfg, git_revision=revision, world_size=run.world, model=model.config.to_dict())
        (out / "config.json").write_text(json.dumps(saved, indent=2))
        if chat_template:
            (out / "chat_template.jinja").write_text(chat_template)


if __name__ == "__main__":
    with one_line_errors():
        print(pretrain_config(pretrain_flags()))
