"""Hugging Face interop: export a LilLM as a `LlamaForCausalLM` directory, and import one back.

The architecture is Llama's, so the export is a renaming (HF_NAMES) plus one permutation: lesson 03 rotates
interleaved RoPE pairs (x0, x1), (x2, x3), ... and transformers rotates halves (x_i, x_{i+D/2}), so the rows
of wq and wk are reordered within each head (interleaved_to_halves; why the scores do not change: notes.md).
The directory loads with no custom code: transformers.AutoModelForCausalLM / AutoTokenizer.from_pretrained(DIR).
Left out on purpose: sharded writes, untied heads, RoPE scaling (lilLM has none of them).

    python 06_model/hf.py export --checkpoint out/ckpt_best --tokenizer data/tokenizer.json --out out/hf
    python 06_model/hf.py import --hf_dir out/hf --out out/imported.safetensors
"""

import argparse
import json
import re
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
HF_NAMES = {  # ours -> LlamaForCausalLM's, without the .weight every key ends with; {i} is the layer index
    "tok_embeddings": "model.embed_tokens", "norm": "model.norm",
    "layers.{i}.attention.wq": "model.layers.{i}.self_attn.q_proj", "layers.{i}.attention.wk": "model.layers.{i}.self_attn.k_proj",
    "layers.{i}.attention.wv": "model.layers.{i}.self_attn.v_proj", "layers.{i}.attention.wo": "model.layers.{i}.self_attn.o_proj",
    "layers.{i}.feed_forward.w1": "model.layers.{i}.mlp.gate_proj", "layers.{i}.feed_forward.w3": "model.layers.{i}.mlp.up_proj",
    "layers.{i}.feed_forward.w2": "model.layers.{i}.mlp.down_proj",
    "layers.{i}.attention_norm": "model.layers.{i}.input_layernorm",
    "layers.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
}
OUR_NAMES = {theirs: ours for ours, theirs in HF_NAMES.items()}


def rename(name: str, table: dict) -> str:
    """A state_dict key through a name table (HF_NAMES, OUR_NAMES, gguf.GGUF_NAMES); one it lacks stays as it is."""
    module, _, param = name.rpartition(".")
    layer = re.search(r"\.(\d+)\.", module)  # layers.3.attention.wq -> layers.{i}.attention.wq, i = 3
    key = module.replace(layer[0], ".{i}.", 1) if layer else module
    return f"{table[key].format(i=layer[1] if layer else '')}.{param}" if key in table else name


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk (n_heads * D, dim): per head, rows (0, 1, 2, 3, ...) -> (0, 2, 4, ..., 1, 3, 5, ...)."""
    out, dim = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)  # (H, 2, D/2, dim)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of interleaved_to_halves."""
    out, dim = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)  # (H, D/2, 2, dim)


def permute_rope(state: dict, cfg, permute) -> dict:
    """`permute` applied to the rows of every wq (q_heads) and wk (kv_heads) in a state_dict with our names."""
    out = {}
    for name, w in state.items():  # layers.i.attention.wq.weight -> attention.wq.weight
        heads = {"attention.wq.weight": cfg.q_heads, "attention.wk.weight": cfg.kv_heads}.get(name.split(".", 2)[-1])
        out[name] = permute(w, heads) if heads else w
    return out


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
    state = permute_rope(weights.float_state(model), model.config, interleaved_to_halves)
    return {rename(k, HF_NAMES): w.detach().to("cpu", dtype).contiguous() for k, w in state.items()}


def export_hf(model, tokenizer_path, out_dir, dtype: torch.dtype = torch.float32, chat_template: str | None = None) -> Path:
    """Write model.safetensors, config.json, generation_config.json and the tokenizer files to out_dir;
    chat_template (a jinja string, lesson 08's) goes into tokenizer_config.json for apply_chat_template."""
    cfg, out_dir, tokenizer_path = model.config, Path(out_dir), Path(tokenizer_path)
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"no tokenizer at {tokenizer_path}: build it with lesson 01 (01_tokenizer/prepare.py)")
    added = {t["content"]: t["id"] for t in json.loads(tokenizer_path.read_text()).get("added_tokens", [])}
    for token, i in SPECIAL.values():
        if added.get(token) != i:
            raise ValueError(f"{tokenizer_path}: special token {token} must have id {i}, has {added.get(token)}")
    state = hf_state_dict(model, dtype)  # refused before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    weights.write_safetensors(state, out_dir / "model.safetensors", {"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}))
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.json")
    # pad inside the vocabulary (</s>, as generation_config): without one, lm-evaluation-harness adds a token past it
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
    state = permute_rope({rename(k, OUR_NAMES): w.float() for k, w in hf_state.items()}, config, halves_to_interleaved)
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
    with weights.one_line_errors():
        if args.command == "export":
            out = export_hf(weights.load_model(args.checkpoint), args.tokenizer, args.out, getattr(torch, args.dtype))
            print(f"wrote {out}: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it")
        else:
            model = import_hf(args.hf_dir)
            weights.save_model(model, args.out)
            print(f"wrote {args.out} ({model.num_params():,} parameters): python 06_model/generate.py --checkpoint {args.out}")


if __name__ == "__main__":
    main()
