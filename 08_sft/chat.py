"""Chat with a fine-tuned lilLM in the terminal: multi-turn, streamed token by token, within max_seq_len.

Each turn renders the whole conversation with the chat template (template.py) and streams the answer with
lesson 06's stream_text until </s>. Before each answer the oldest exchanges are dropped (the system message
stays) until the prompt plus room for max_new_tokens fits the model's window (notes.md §6).

One line of input is one user message; write \\n for a line break inside it. End with Ctrl-D. --checkpoint
takes what sft.py writes (full weights, or LoRA adapters loaded merged onto their base), any lilLM checkpoint,
or a Hugging Face export directory.
Left out on purpose: keeping the KV cache across turns, editing or regenerating turns, a history file.

Usage:
    python 08_sft/chat.py --checkpoint out/sft/ckpt_best
    python 08_sft/chat.py --checkpoint out/sft/hf --temperature 0 --system "Answer in one line."
    printf 'Who says this?\\nWho is there?\\n' | python 08_sft/chat.py --checkpoint out/sft/ckpt_best
"""

import argparse
import sys
from importlib import import_module
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
weights = import_module("06_model.weights")
generate = import_module("06_model.generate")
DataError = import_module("01_tokenizer.corpus").DataError
template = import_module("08_sft.template")


def fit_window(fmt, messages: list, max_len: int) -> tuple:
    """(prompt ids, messages kept): drop the oldest exchanges (a user message and the answers after it) until
    the prompt has at most max_len tokens. The system message and the last user message always stay."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    while True:
        ids, _ = fmt.encode(system + rest, add_generation_prompt=True)
        if len(ids) <= max_len:
            return ids, system + rest
        later_users = [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]
        if not later_users:
            raise ValueError(f"this message alone makes a {len(ids)}-token prompt; the model's window leaves room for {max_len}")
        rest = rest[later_users[0]:]


def chat(model, fmt, lines, out, system: str | None = None, max_new_tokens: int = 128, **sampling) -> list:
    """Run a conversation over the user messages in `lines`; return the final message list."""
    messages = [{"role": "system", "content": system}] if system else []
    for line in lines:
        text = line.rstrip("\n").replace("\\n", "\n")
        if not text.strip():
            continue
        try:  # a forged special token or a message too long for the window: say so, keep chatting
            room = model.config.max_seq_len - max_new_tokens  # the answer needs its positions too
            prompt, kept = fit_window(fmt, messages + [{"role": "user", "content": text}], room)
        except ValueError as e:
            print(f"(not sent: {e})", file=sys.stderr)
            continue
        if len(kept) < len(messages) + 1:
            print(f"(dropped the {len(messages) + 1 - len(kept)} oldest messages to fit {model.config.max_seq_len} tokens)", file=sys.stderr)
        # The rendered conversation as text: lesson 06's stream_text encodes it back to exactly `prompt`
        # (special-token text becomes the special ids, as in apply_chat_template) and streams the answer.
        text = fmt.tokenizer.decode(prompt, skip_special_tokens=False)
        out.write("assistant> ")
        answer = []
        for piece in generate.stream_text(model, fmt.tokenizer, text, max_new_tokens, stop_id=fmt.eot_id, **sampling):
            out.write(piece)
            out.flush()
            answer.append(piece)
        out.write("\n")
        messages = kept + [{"role": "assistant", "content": "".join(answer)}]
    return messages


def typed_lines():
    """Lines typed at a `you> ` prompt, until Ctrl-D."""
    while True:
        try:
            yield input("you> ")
        except EOFError:
            return


def main(argv=None):
    parser = argparse.ArgumentParser(description="Chat with a fine-tuned lilLM (one line of input per message).")
    parser.add_argument("--checkpoint", required=True, help="sft.py output (out/sft/ckpt_best), a lilLM checkpoint, or a Hugging Face export dir")
    parser.add_argument("--base", default=None, help="base checkpoint for LoRA adapters (default: the one recorded in them)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the checkpoint, else data/tokenizer.json)")
    parser.add_argument("--system", default=None, help="a system message that opens the conversation")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="longest answer, in tokens (default: max_seq_len / 4)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens")
    parser.add_argument("--top_p", type=float, default=0.95, help="then among the smallest set reaching this probability")
    parser.add_argument("--seed", type=int, default=None, help="seed the sampler for a repeatable conversation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    try:
        model, tok, _ = weights.load_pair(args.checkpoint, args.tokenizer, args.device, args.base)
        fmt = template.ChatFormat(tok)
        args.max_new_tokens = args.max_new_tokens or model.config.max_seq_len // 4
        if not 0 < args.max_new_tokens < model.config.max_seq_len:
            raise ValueError(f"--max_new_tokens must be in [1, {model.config.max_seq_len - 1}] (max_seq_len leaves no room)")
    except (FileNotFoundError, ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)  # one line and exit code 2, as lessons 01 and 07 do
        sys.exit(2)
    generator = None if args.seed is None else torch.Generator(device=args.device).manual_seed(args.seed)
    lines = sys.stdin
    if sys.stdin.isatty():
        print(f"{model.num_params():,} parameters, window {model.config.max_seq_len} tokens. One line per message, Ctrl-D to end.")
        lines = typed_lines()
    chat(model, fmt, lines, sys.stdout, args.system, args.max_new_tokens, temperature=args.temperature,
         top_k=args.top_k, top_p=args.top_p, generator=generator)


if __name__ == "__main__":
    main()
