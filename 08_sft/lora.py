"""LoRA: fine-tune a frozen model through low-rank updates (Hu et al., 2021, arXiv:2106.09685).

    h = W x + (alpha / r) B A x        W (d_out, d_in) frozen,  A (r, d_in),  B (d_out, r),  r << d_in, d_out

Only A and B train. B starts at zero, so at initialization the LoRA model IS the base model (fine-tuning
starts from the pretrained function, not from a perturbed one); A starts random, because with both at
zero neither would ever get a gradient (dL/dB = (alpha/r) g (A x)^T and dL/dA = (alpha/r) B^T g x^T).
The alpha / r factor keeps the update's scale roughly independent of r, so changing the rank does not
mean retuning the learning rate. Merging folds the update into the weight, W' = W + (alpha / r) B A:
a plain LilLM again, which save_model, generation and the Hugging Face export use with no LoRA code.

Layout: as nn.Linear, x (..., d_in) -> (..., d_out). The wrapper keeps the base weight under its own
name (`.weight`), so a LoRA model's state_dict is the base's plus `lora_A`/`lora_B` keys.
Left out on purpose: dropout on the LoRA path, LoRA on the tied embedding/output matrix, quantized bases
(QLoRA), DoRA, several adapters at once.

Demo: python 08_sft/lora.py
"""

import argparse
import json
import math
import sys
from importlib import import_module
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
lillm = import_module("06_model.model")
weights = import_module("06_model.weights")
checkpoint = import_module("07_pretrain_ddp.checkpoint")

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the linear layers of a block (05's attention, 04's FFN)
ADAPTER_FILE = weights.ADAPTER_FILE


class LoRALinear(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        assert linear.bias is None, "lilLM's linear layers have no bias"
        assert isinstance(rank, int) and rank > 0, f"rank must be a positive integer, got {rank!r}"
        d_out, d_in = linear.weight.shape
        self.weight = linear.weight  # the base's own Parameter, frozen by apply_lora
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        # A: nn.Linear's Kaiming-uniform init, as in loralib, the paper's code (its text says "random
        # Gaussian"); B: zeros, so that the update B A starts at exactly zero.
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, device=linear.weight.device))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, device=linear.weight.device))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):  # (..., d_in) -> (..., d_out)
        # Two thin matmuls, (d_in -> r -> d_out), never the (d_out, d_in) product B A: that is the saving.
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function: W + (alpha / r) B A."""
        d_out, d_in = self.weight.shape
        linear = nn.Linear(d_in, d_out, bias=False, device=self.weight.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scale * (self.lora_B @ self.lora_A))
        return linear


def lora_modules(model: nn.Module) -> dict:
    """{qualified name: LoRALinear} of every wrapped layer."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=("wq", "wk", "wv", "wo")) -> list:
    """Wrap every linear layer whose name is in `targets` (in place), freeze every other parameter.
    Returns the wrapped layers' names."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be a non-empty subset of {', '.join(TARGETS)}; got {', '.join(targets) or 'none'}")
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters: merge them (merge_lora) before adding new ones")
    for p in model.parameters():
        p.requires_grad_(False)  # the base stays exactly as pretrained; the optimizer sees only A and B
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{name}.{child_name}")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (in place); the model is a plain one again, all parameters trainable."""
    for name, m in lora_modules(model).items():
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, m.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapter_state(model: nn.Module) -> dict:
    """Only the adapters: {name.lora_A / name.lora_B: tensor}."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapters(model: nn.Module, path, base: str) -> None:
    """Write the adapters to `path` (safetensors, atomically) with rank, alpha, targets and the base's identity:
    lesson 06's load_model folds them into that base, W + (alpha / r) B A, wherever they are loaded."""
    mods = lora_modules(model)
    assert mods, "the model has no LoRA adapters to save"
    first = next(iter(mods.values()))
    meta = {"rank": first.rank, "alpha": first.alpha, "targets": sorted({n.rsplit(".", 1)[1] for n in mods}),
            "base": str(base), "base_fingerprint": weights.fingerprint(model.state_dict())}
    weights.write_safetensors({k: v.detach().contiguous() for k, v in adapter_state(model).items()}, path,
                              {"lillm_lora": json.dumps(meta)})


def load_adapters(model: nn.Module, path) -> nn.Module:
    """Wrap `model` as recorded in the adapter file (or a directory holding it) and load the adapters, unmerged,
    to train on (in place); one-line errors on mismatch. Merged loads are lesson 06's load_model."""
    path = Path(path)
    meta, state, _ = weights.read_safetensors(path / weights.ADAPTER_FILE if path.is_dir() else path, "lillm_lora")
    if weights.fingerprint(model.state_dict()) != meta["base_fingerprint"]:
        raise ValueError(f"{path}: these adapters were trained on another base ({meta['base']}); load that one")
    apply_lora(model, meta["rank"], meta["alpha"], meta["targets"])
    expected = adapter_state(model)
    if {k: v.shape for k, v in expected.items()} != {k: v.shape for k, v in state.items()}:
        raise ValueError(f"{path}: its tensors do not match rank {meta['rank']} on {meta['targets']}")
    model.load_state_dict(state, strict=False)
    return model


# ---- LoRA in a training stage (lessons 08, 10, 11): its flags, its learning rate, its checkpoints ------------

LORA_DEFAULTS = dict(lora=False, lora_rank=8, lora_alpha=16.0, lora_targets="wq,wk,wv,wo")
SHAPE = ("base", *LORA_DEFAULTS, "optimizer")  # what a resumed run may not change, in every stage that starts from a base


def add_lora_flags(flag, base: str = "a frozen base") -> None:
    flag("lora", f"train LoRA adapters on {base} instead of every weight", action=argparse.BooleanOptionalAction)
    flag("lora_rank", "LoRA rank r", type=int)
    flag("lora_alpha", "LoRA alpha: the update is scaled by alpha / r", type=float)
    flag("lora_targets", f"comma-separated linear layers to adapt, from {','.join(TARGETS)}")


def with_lr(defaults: dict, given: dict, full_lr: float) -> dict:
    """A stage's defaults with its learning rate: the given one, else 1e-3 with LoRA (the adapters start at zero:
    a larger step) or full_lr; min_lr lr / 10."""
    lr = given.get("lr") or (1e-3 if given.get("lora", defaults["lora"]) else full_lr)
    return dict(defaults, lr=lr, min_lr=lr / 10)


def hooks(cfg: dict, model) -> tuple:
    """(adapt, load, write_weights) for lesson 07's stage.start_model and train.fit: with --lora, new adapters on
    the frozen base (or, resuming, the checkpoint's, unmerged, on it), and checkpoints that hold only the
    adapters; without, None for each: the base as is, the checkpoint's weights, model.safetensors."""
    if not cfg["lora"]:
        return None, None, None
    adapt = lambda m: apply_lora(m, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_targets"].split(","))  # noqa: E731
    load = lambda ckpt_dir, base: load_adapters(base, checkpoint.find(ckpt_dir) or ckpt_dir)  # noqa: E731
    return adapt, load, lambda d: save_adapters(model, d / weights.ADAPTER_FILE, cfg["base"])


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = lillm.ModelConfig()
    model = lillm.LilLM(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 32))
    with torch.no_grad():
        base_logits, _ = model(tokens)
        names = apply_lora(model, rank=8, alpha=16)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        init_logits, _ = model(tokens)
        for m in lora_modules(model).values():
            m.lora_B.normal_(std=0.02)  # stands in for training, which moves B away from zero
        lora_logits, _ = model(tokens)
        merged_logits, _ = merge_lora(model)(tokens)
    print(f"r=8 on wq, wk, wv, wo of {cfg.n_layers} blocks: {len(names)} adapters, {n_train:,} trainable parameters "
          f"({100 * n_train / model.num_params():.2f}% of {model.num_params():,})")
    print(f"max |LoRA at init - base|       = {(init_logits - base_logits).abs().max():.1e}")
    print(f"max |merged - unmerged LoRA|    = {(merged_logits - lora_logits).abs().max():.1e}")
    assert torch.equal(init_logits, base_logits) and torch.allclose(merged_logits, lora_logits, atol=1e-4)
    print("checked: a LoRA model at initialization is the base model, and merging does not change its outputs")
