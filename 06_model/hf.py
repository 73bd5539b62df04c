"""Hugging Face interop: export a LilLM as a `LlamaForCausalLM` directory, and import one back.

The architecture is Llama's, so the export is a renaming plus one permutation:

    tok_embeddings            -> model.embed_tokens        (lm_head is tied to it: not stored)
    layers.i.attention.wq/wk  -> model.layers.i.self_attn.q_proj/k_proj   rows permuted, see below
    layers.i.attention.wv/wo  -> model.layers.i.self_attn.v_proj/o_proj
    layers.i.feed_forward.w1/w3/w2 -> model.layers.i.mlp.gate_proj/up_proj/down_proj
    layers.i.attention_norm/ffn_norm -> model.layers.i.input_layernorm/post_attention_layernorm
    norm                      -> model.norm

RoPE pairs: lesson 03 rotates interleaved pairs (x0, x1), (x2, x3), ... (Meta); transformers rotates
split halves (x_i, x_{i+D/2}). Within each head, output row 2i (the first of pair i) must become row i
and row 2i+1 must become row i + D/2: w.view(H, D/2, 2, dim).transpose(1, 2), as transformers'
convert_llama_weights_to_hf does. Permuting the rows of wq and wk permutes the head dimension of q and
k the same way, and q.k is a sum over that dimension, so the scores do not change. wv is not rotated.

The directory loads with no custom code:
    transformers.AutoModelForCausalLM.from_pretrained(DIR), transformers.AutoTokenizer.from_pretrained(DIR)
Left out on purpose: sharded writes, untied heads, RoPE scaling (lilLM has none of them).

Commands:
    python 06_model/hf.py export --checkpoint out/ckpt_best --tokenizer data/tokenizer.json --out out/hf
    python 06_model/hf.py import --hf_dir out/hf --out out/imported.safetensors
"""

import argparse
import json
import shutil
import sys
from importlib import import_module
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
lillm = import_module("06_model.model")
weights = import_module("06_model.weights")
ffn_hidden_dim = import_module("04_swiglu.swiglu").ffn_hidden_dim

SPECIAL = {"unk_token": ("<unk>", 0), "bos_token": ("<s>", 1), "eos_token": ("</s>", 2)}  # lesson 01's ids
LAYER_NAMES = {  # ours -> transformers', inside layers.i
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk (n_heads * D, dim): per head, rows (0, 1, 2, 3, ...) -> (0, 2, 4, ..., 1, 3, 5, ...)."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)  # (H, 2, D/2, dim)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_halves."""
    out, dim = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)  # (H, D/2, 2, dim)


def hf_name(name: str) -> str:
    """Our state_dict key -> LlamaForCausalLM's."""
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        module, param = rest.rsplit(".", 1)
        return f"model.layers.{i}.{LAYER_NAMES[module]}.{param}"
    return {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}[name]


def our_name(name: str) -> str:
    """LlamaForCausalLM's key -> ours (the inverse of hf_name); an unknown key stays, to be reported."""
    if name.startswith("model.layers."):
        _, _, i, rest = name.split(".", 3)
        module, param = rest.rsplit(".", 1)
        ours = {v: k for k, v in LAYER_NAMES.items()}
        return f"layers.{i}.{ours[module]}.{param}" if module in ours else name
    return {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}.get(name, name)


def hf_config(cfg, dtype: torch.dtype) -> dict:
    """config.json of LlamaForCausalLM. Older transformers read rope_theta/torch_dtype, newer ones map them."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.q_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
    }


def hf_state_dict(model, dtype: torch.dtype = torch.float32) -> dict:
    """LlamaForCausalLM's state_dict for `model`, without lm_head.weight (tied to embed_tokens)."""
    cfg, state = model.config, {}
    for name, w in model.state_dict().items():
        if name == weights.TIED:
            continue
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            w = interleaved_to_halves(w, cfg.q_heads if ".wq." in name else cfg.kv_heads)
        state[hf_name(name)] = w.detach().to("cpu", dtype).contiguous()
    return state


def export_hf(model, tokenizer_path, out_dir, dtype: torch.dtype = torch.float32, chat_template: str | None = None) -> Path:
    """Write model.safetensors, config.json, generation_config.json and the tokenizer files to out_dir;
    chat_template (a jinja string, lesson 08's) goes into tokenizer_config.json for apply_chat_template."""
    cfg, out_dir, tokenizer_path = model.config, Path(out_dir), Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"no tokenizer at {tokenizer_path}: build it with lesson 01 (01_tokenizer/prepare.py)")
    vocab = json.loads(tokenizer_path.read_text())
    added = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
    for token, i in SPECIAL.values():
        if added.get(token) != i:
            raise ValueError(f"{tokenizer_path}: special token {token} must have id {i}, has {added.get(token)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    weights.write_safetensors(hf_state_dict(model, dtype), out_dir / "model.safetensors", {"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}, indent=2))
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.json")
    # pad inside the vocabulary (</s>, as generation_config pads): without one, lm-evaluation-harness adds a
    # token past the embedding table
    special = {key: token for key, (token, _) in SPECIAL.items()} | {"pad_token": "</s>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",  # the generic tokenizer.json wrapper: no custom code
        **special, "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False,
        **({"chat_template": chat_template} if chat_template else {}),
    }, indent=2))
    return out_dir


def import_hf(hf_dir, device="cpu"):
    """A float32 LilLM from a LlamaForCausalLM directory whose architecture lilLM can express."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {hf_dir}: pass a Hugging Face Llama model directory")
    c = json.loads((hf_dir / "config.json").read_text())
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "rms_norm_eps")
    if missing := [k for k in required if k not in c]:
        raise ValueError(f"{hf_dir}/config.json lacks {missing}: not a Llama config")
    rope = c.get("rope_parameters") or {}
    problems = [f"{k}={c.get(k)!r}" for k, ok in [
        ("model_type", c.get("model_type") == "llama"), ("hidden_act", c.get("hidden_act", "silu") == "silu"),
        ("attention_bias", not c.get("attention_bias")), ("mlp_bias", not c.get("mlp_bias")),
        ("rope_scaling", not c.get("rope_scaling") and rope.get("rope_type", "default") == "default"),
        ("head_dim", c.get("head_dim") in (None, c["hidden_size"] // c["num_attention_heads"])),
    ] if not ok]
    if problems:
        raise ValueError(f"{hf_dir}: not a plain Llama that lilLM can load ({', '.join(problems)})")
    d, hidden = c["hidden_size"], c["intermediate_size"]
    # multiple_of is not in a Llama config: the default if it gives the same hidden size, else the size itself.
    multiple_of = next((m for m in (128, hidden) if ffn_hidden_dim(d, m) == hidden), None)
    if multiple_of is None:
        raise ValueError(f"{hf_dir}: intermediate_size {hidden} is below lilLM's SwiGLU size for d_model {d}")
    config = lillm.ModelConfig(
        vocab_size=c["vocab_size"], d_model=d, n_layers=c["num_hidden_layers"], q_heads=c["num_attention_heads"],
        kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], max_seq_len=c["max_position_embeddings"],
        multiple_of=multiple_of, norm_eps=c["rms_norm_eps"], rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
    )
    index = hf_dir / "model.safetensors.index.json"  # sharded checkpoints list their files in an index
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    try:
        hf_state = {k: v for f in files for k, v in load_file(str(hf_dir / f)).items()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{hf_dir}: cannot read its safetensors weights ({e})") from None
    head = hf_state.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, hf_state.get("model.embed_tokens.weight", head)):
        raise ValueError(f"{hf_dir}: lm_head differs from embed_tokens, and lilLM ties them")
    state = {}
    for name, w in hf_state.items():
        key = our_name(name)
        if key.endswith(("attention.wq.weight", "attention.wk.weight")):
            w = halves_to_interleaved(w, config.q_heads if ".wq." in key else config.kv_heads)
        state[key] = w.float()
    return weights.build_from_state(config, state, device, str(hf_dir))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a lilLM checkpoint to Hugging Face Llama, or import one.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="lilLM checkpoint -> LlamaForCausalLM directory")
    ex.add_argument("--checkpoint", required=True, help="save_model file or out/ckpt_*/ directory")
    ex.add_argument("--tokenizer", default="data/tokenizer.json", help="lesson 01's tokenizer.json")
    ex.add_argument("--out", required=True, help="directory to write")
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the stored weights")
    im = sub.add_parser("import", help="LlamaForCausalLM directory -> lilLM checkpoint")
    im.add_argument("--hf_dir", required=True, help="directory with config.json and model.safetensors")
    im.add_argument("--out", required=True, help="safetensors file to write (load_model reads it)")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            model = weights.load_model(args.checkpoint)
            out = export_hf(model, args.tokenizer, args.out, getattr(torch, args.dtype))
            print(f"wrote {out}: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it")
        else:
            model = import_hf(args.hf_dir)
            weights.save_model(model, args.out)
            print(f"wrote {args.out} ({model.num_params():,} parameters): python 06_model/generate.py --checkpoint {args.out}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
