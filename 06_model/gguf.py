"""GGUF export: one file that llama.cpp and ollama run as it is, giving lilLM's tokens and logits.

GGUF (llama.cpp's format) is a header, typed key-value metadata (the config AND the whole tokenizer: no
config.json, no tokenizer.json), then the named, typed tensors (f32, f16, q8_0), aligned to be mmapped.
Spec: github.com/ggml-org/ggml/blob/master/docs/gguf.md; names: gguf-py's constants.py (MODEL_TENSOR, Keys).
RoPE trap: llama.cpp's "llama" rotates consecutive pairs, as lesson 03 does, so wq and wk go in as they are,
without the HF export's permutation (notes.md). f16 and q8_0 keep the 1-D norm gains in f32.
Left out: k-quants (llama-quantize does them from an f16 file), split files, RoPE scaling, untied heads.

    python 06_model/gguf.py export --checkpoint out/sft/ckpt_best --out out/lillm.gguf [--type f32|f16|q8_0]
    then: llama-cli -m out/lillm.gguf, or ollama create lillm -f Modelfile (notes.md)
"""

import argparse
import json
import sys
from importlib import import_module
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# This file is named gguf.py: run by path, its own directory would come first on sys.path and
# `import gguf` would import this file instead of the gguf package. Drop that directory.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import gguf  # noqa: E402  the format's own Python writer, reader and quantizer (llama.cpp's gguf-py)

weights = import_module("06_model.weights")
hf = import_module("06_model.hf")
commands = import_module("01_tokenizer.commands")
tokenizer_lib = import_module("01_tokenizer.tokenizer")

Q = gguf.GGMLQuantizationType
TYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
         "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}  # --type -> (type of the 2-D matrices, general.file_type)
GGUF_NAMES = {  # ours -> llama.cpp's, without the .weight every key ends with; {i} is the layer index
    "tok_embeddings": "token_embd", "norm": "output_norm",  # output.weight is tied: not stored, llama.cpp reuses token_embd
    "layers.{i}.attention.wq": "blk.{i}.attn_q", "layers.{i}.attention.wk": "blk.{i}.attn_k",
    "layers.{i}.attention.wv": "blk.{i}.attn_v", "layers.{i}.attention.wo": "blk.{i}.attn_output",
    "layers.{i}.feed_forward.w1": "blk.{i}.ffn_gate", "layers.{i}.feed_forward.w3": "blk.{i}.ffn_up",
    "layers.{i}.feed_forward.w2": "blk.{i}.ffn_down",
    "layers.{i}.attention_norm": "blk.{i}.attn_norm", "layers.{i}.ffn_norm": "blk.{i}.ffn_norm",
}
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's split regex, lesson 01's (ByteLevel, use_regex, no prefix space)


def gguf_name(name: str) -> str:
    """Our state_dict key -> llama.cpp's tensor name."""
    return hf.rename(name, GGUF_NAMES)


def read_vocab(tokenizer_path, vocab_size: int) -> tuple[list, list, list]:
    """(tokens, types, merges) of lesson 01's tokenizer.json, padded to the model's vocab_size with unused tokens."""
    tok = tokenizer_lib.load_tokenizer(tokenizer_path)  # one-line DataError if missing or unreadable
    spec = json.loads(tok.to_str())
    specials = [tok.id_to_token(i) for i in range(len(tokenizer_lib.SPECIAL_TOKENS))]
    if specials != tokenizer_lib.SPECIAL_TOKENS:
        raise ValueError(f"{tokenizer_path}: special tokens must be {' '.join(tokenizer_lib.SPECIAL_TOKENS[:3])} "
                         f"<r0>..<r12> at ids 0..15 (lesson 01), found {specials[:4]}...")
    pre = spec.get("pre_tokenizer") or {}
    gpt2_split = pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True)
    if spec["model"]["type"] != "BPE" or not gpt2_split:
        raise ValueError(f"{tokenizer_path}: not lesson 01's byte-level BPE (ByteLevel, GPT-2 regex, no prefix space), "
                         f"which is what GGUF's pre-tokenizer {PRE_TOKENIZER!r} names")
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(f"{tokenizer_path} has {n} tokens, more than the model's vocab_size {vocab_size}")
    tokens = [tok.id_to_token(i) for i in range(n)] + [f"[PAD{i}]" for i in range(n, vocab_size)]
    types = [gguf.TokenType.CONTROL if i < len(specials) else gguf.TokenType.NORMAL for i in range(n)]
    types += [gguf.TokenType.UNUSED] * (vocab_size - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]  # "a b", GGUF's spelling
    return tokens, types, merges


def tensor_data(w: torch.Tensor, qtype) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(array to store, its GGML type): 1-D gains in f32; matrices in qtype (q8_0 needs rows of 32k weights)."""
    a = w.detach().float().cpu().numpy()  # (rows, cols) for a matrix: GGUF stores it as ne = (cols, rows)
    if a.ndim == 1 or qtype == Q.F32:
        return a, Q.F32
    if qtype == Q.Q8_0 and a.shape[1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0  # uint8 bytes (rows, cols / 32 * 34)
    return a.astype(np.float16), Q.F16


def export_gguf(model, tokenizer_path, out_path, type_name: str = "f32", chat_template: str | None = None) -> Path:
    """Write `model` and lesson 01's tokenizer to one GGUF file, atomically (a temp file, then os.replace)."""
    if type_name not in TYPES:
        raise ValueError(f"unknown --type {type_name!r}: pick one of {', '.join(TYPES)}")
    qtype, file_type = TYPES[type_name]
    cfg, state = model.config, weights.float_state(model)
    tokens, types, merges = read_vocab(tokenizer_path, cfg.vocab_size)
    out_path = Path(out_path)
    with commands.atomic_write(out_path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")  # writes general.architecture = "llama"
        for add, value in [  # the metadata: the config, then the whole tokenizer
            (w.add_name, "lilLM"), (w.add_file_type, file_type), (w.add_vocab_size, cfg.vocab_size),
            (w.add_context_length, cfg.max_seq_len), (w.add_embedding_length, cfg.d_model), (w.add_block_count, cfg.n_layers),
            (w.add_feed_forward_length, cfg.hidden_dim), (w.add_head_count, cfg.q_heads), (w.add_head_count_kv, cfg.kv_heads),
            (w.add_layer_norm_rms_eps, cfg.norm_eps), (w.add_rope_freq_base, cfg.rope_theta),
            (w.add_rope_dimension_count, cfg.head_dim),  # all of each head is rotated
            (w.add_tokenizer_model, "gpt2"),  # byte-level BPE with merges (llama.cpp's name, not the GPT-2 model)
            (w.add_tokenizer_pre, PRE_TOKENIZER), (w.add_token_list, tokens), (w.add_token_types, types),
            (w.add_token_merges, merges), (w.add_bos_token_id, tokenizer_lib.BOS_ID),
            (w.add_eos_token_id, tokenizer_lib.EOT_ID), (w.add_unk_token_id, tokenizer_lib.UNK_ID),
            (w.add_pad_token_id, tokenizer_lib.EOT_ID),  # as the HF export's generation_config
            (w.add_add_bos_token, False), (w.add_add_eos_token, False),  # encode adds nothing; the chat template adds <s>
        ]:
            add(value)
        if qtype == Q.Q8_0:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if chat_template:  # without transformers' {% generation %} markers (a training mask): plain Jinja renders it
            w.add_chat_template(chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
        for name, tensor in state.items():
            data, dtype = tensor_data(tensor, qtype)
            w.add_tensor(gguf_name(name), data, raw_dtype=dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a lilLM checkpoint to one GGUF file (llama.cpp, ollama).")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="lilLM checkpoint -> .gguf")
    ex.add_argument("--checkpoint", required=True,
                    help="save_model file, out/ckpt_*/ or out/sft/ckpt_*/ (LoRA adapters load merged), or an HF export dir")
    ex.add_argument("--tokenizer", default=None,
                    help="lesson 01's tokenizer.json (default: beside the checkpoint, else data/tokenizer.json)")
    ex.add_argument("--out", required=True, help=".gguf file to write")
    ex.add_argument("--type", default="f32", help=f"weights of the matrices: {', '.join(TYPES)} (default f32)")
    ex.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                    help="store the checkpoint's chat template (chat_template.jinja in its run, an HF export's "
                         "tokenizer_config.json; a base model has none); --no-chat leaves it out")
    args = parser.parse_args(argv)
    with weights.one_line_errors():
        if args.type not in TYPES:  # before loading anything
            raise ValueError(f"unknown --type {args.type!r}: pick one of {', '.join(TYPES)}")
        model, _, tokenizer = weights.load_pair(args.checkpoint, args.tokenizer)  # LoRA adapters load merged
        chat = weights.chat_template(args.checkpoint) if args.chat else None
        out = export_gguf(model, tokenizer, args.out, args.type, chat)
    print(f"wrote {out} ({args.type}, {out.stat().st_size:,} bytes, {model.num_params():,} parameters"
          f"{', chat template' if chat else ''}): llama-cli -m {out}")


if __name__ == "__main__":
    main()
