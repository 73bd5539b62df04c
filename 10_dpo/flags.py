"""DPO's flags: lesson 07's resolver (config.resolve) with this stage's defaults, as lesson 08's sft.py has them.

    flags given on the command line  >  the checkpoint's config (with --resume)  >  DEFAULTS

Demo: python 10_dpo/flags.py --help
"""

import sys
from importlib import import_module
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
config = import_module("07_pretrain_ddp.config")
sft = import_module("08_sft.sft")  # the LoRA flags every stage shares
preferences = import_module("10_dpo.preferences")

DEFAULTS = dict(
    base="out/sft/ckpt_best", tokenizer=None, data=None, val_data=None, hf_dataset=None, hf_split="train",
    hf_limit=0, data_dir=preferences.DEFAULT_DIR, val_fraction=0.05, out_dir="out/dpo", beta=0.1, max_pairs=2400, val_pairs=256,
    **sft.LORA_DEFAULTS, batch_size=16, grad_accum=1, max_steps=150, lr=None, min_lr=None, warmup_steps=10, weight_decay=0.0, grad_clip=1.0,
    eval_interval=50, log_interval=10, eval_prompts=128, answer_tokens=32, seed=1337, device="auto", dtype="auto", stop_at=0,
    resume=False, dist_timeout=30.0,
)
SHAPE = sft.SHAPE  # what a resumed run may not change


def parse_args(argv=None) -> dict:
    """DPO's flags; only those given on the command line end up in the dict."""
    parser, flag = config.make_parser("DPO: align a lilLM chat model with pairs of better and worse answers.", {"default": DEFAULTS})
    flag("base", "the SFT model, the reference: a lilLM checkpoint (08's out/sft/ckpt_best), file, or Hugging Face export")
    flag("tokenizer", "tokenizer.json (None: beside the base, else data/tokenizer.json; checked against the base's sha256)")
    flag("data", "training pairs: JSONL files with TRL's columns {\"prompt\", \"chosen\", \"rejected\"} (None: the offline set)", nargs="+")
    flag("val_data", "validation pairs, JSONL (None: a fixed val_fraction of --data or of the hub split)", nargs="+")
    flag("hf_dataset", "a Hugging Face dataset with TRL's columns, instead of --data (needs the hub)")
    flag("hf_split", "its split")
    flag("hf_limit", "read at most this many hub pairs; 0: all", type=int)
    flag("data_dir", "where the offline preference set is written (preferences.py)")
    flag("val_fraction", "share of pairs held out when no --val_data is given (lesson 01's crc32 rule)", type=float)
    flag("beta", "DPO's beta: the price of moving away from the reference (small: far, large: stay close)", type=float)
    flag("max_pairs", "train on a seeded subset of this many pairs (the reference scores each once, at the start); 0: all", type=int)
    flag("val_pairs", "validation pairs, the first of the set; 0: all", type=int)
    sft.add_lora_flags(flag, "the frozen SFT model")
    config.add_training_flags(flag)  # lr None: 1e-4 full, 1e-3 LoRA; min_lr None: lr / 10
    flag("eval_prompts", "validation prompts answered greedily (exact answers) and sampled (KL), before and after", type=int)
    flag("answer_tokens", "longest answer, in tokens, for those measurements", type=int)
    return vars(parser.parse_args(argv))


def resolve_config(given: dict, saved: dict | None = None) -> dict:
    cfg = config.resolve(given, sft.with_lr(DEFAULTS, given, 1e-4), saved, SHAPE, ("lora_rank", "eval_prompts", "answer_tokens"))
    if cfg["data"] and cfg["hf_dataset"]:
        raise config.TrainError("give --data or --hf_dataset, not both")
    if cfg["beta"] <= 0 or cfg["max_pairs"] < 0 or cfg["val_pairs"] < 0:
        raise config.TrainError(f"need beta > 0, max_pairs >= 0 and val_pairs >= 0; got {cfg['beta']}, {cfg['max_pairs']}, {cfg['val_pairs']}")
    return cfg


if __name__ == "__main__":
    with config.one_line_errors():
        print(resolve_config(parse_args()))
