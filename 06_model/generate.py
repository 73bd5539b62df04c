"""Stream text from a lilLM checkpoint, token by token, with the KV cache of model.py.

Byte-level BPE tokens are bytes, not characters: a token can end halfway through a multi-byte UTF-8
character (é, 日). So the text printed is always a decode of ALL tokens so far, and a step whose decode
ends in the replacement character U+FFFD (an unfinished character) waits for the next token.

Usage:
    python 06_model/generate.py --checkpoint out/ckpt_best --prompt "Once upon a time"
    python 06_model/generate.py --checkpoint out/hf --prompt "..." --temperature 0   # greedy, HF export dir
    python 06_model/generate.py --checkpoint out/ckpt_best --prompt "..." --int8 --compile  # fastest on a CPU
"""

import argparse
import sys
from importlib import import_module
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
lillm = import_module("06_model.model")
int8 = import_module("06_model.int8")

HOW_TO_GET_ONE = ("train one with `python 07_pretrain_ddp/train.py`, or import a Hugging Face Llama with "
                  "`python 06_model/hf.py import --hf_dir DIR --out model.safetensors`")


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int, **sampling):
    """Yield pieces of text as they become printable; the concatenation is the decoded continuation."""
    ids, shown = [], ""
    for step in model.generate_stream([tokenizer.encode(prompt).ids], max_new_tokens, **sampling):
        if step[0] is None:
            continue
        ids.append(step[0])
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # an unfinished UTF-8 character: wait for its next byte
            yield text[len(shown):]
            shown = text


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate text from a lilLM checkpoint (streams to stdout).")
    parser.add_argument("--checkpoint", help="save_model file, out/ckpt_*/ directory or Hugging Face export directory")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--tokenizer", default="data/tokenizer.json", help="lesson 01's tokenizer.json")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top_p", type=float, default=0.95, help="nucleus: smallest set with this probability")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step")
    parser.add_argument("--int8", action="store_true",
                        help="int8 weight-only matrices (06_model/int8.py): a quarter of the bytes per token")
    args = parser.parse_args(argv)
    if not args.checkpoint or not Path(args.checkpoint).exists():
        sys.exit(f"no checkpoint{' at ' + args.checkpoint if args.checkpoint else ' given'}: {HOW_TO_GET_ONE}")
    if not Path(args.tokenizer).is_file():
        sys.exit(f"no tokenizer at {args.tokenizer}: build it with lesson 01 (01_tokenizer/prepare.py) or pass --tokenizer")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(args.tokenizer)
    try:
        model = lillm.load_model(args.checkpoint, args.device)
        if args.int8:
            int8.quantize_int8(model)
        if not args.prompt or not tokenizer.encode(args.prompt).ids:
            raise ValueError("the prompt is empty: pass --prompt TEXT")
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        print(args.prompt, end="", flush=True)
        for piece in stream_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k or None, top_p=args.top_p, generator=generator, compile=args.compile):
            print(piece, end="", flush=True)
        print()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
