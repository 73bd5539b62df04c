"""Bits per byte: a language model's loss in a unit that does not depend on its tokenizer.

    bpb = sum_i nats_i / (ln 2 * sum_i bytes(y_i))

nats_i is the cross-entropy of target token y_i (the loss the trainer logs, before averaging) and
bytes(y_i) the number of UTF-8 bytes that token spells; special tokens (</s>, <s>, the chat roles)
spell no text and count 0 bytes (their loss still counts: predicting a document's end is part of the
job). The loss per token divides by a count that the tokenizer chose: a tokenizer with longer tokens
has fewer of them, so a higher loss per token can be a better model. Bytes are the same for every
tokenizer, so bpb compares any two checkpoints on the same text (notes.md works an example).

A token's bytes come from lesson 01's byte table (bpe.token_bytes: "Ġthe" is b" the"), computed
once per tokenizer as a (vocab,) tensor; decode([id]) would give U+FFFD for a token that ends inside
a multi-byte character and count its bytes wrong.

Left out on purpose: sliding windows with overlap (every target here has only the context inside its
own window, as in the trainer's validation loss).

Demo (a tiny example worked by hand): python 09_eval/bpb.py
"""

import math
import sys
from contextlib import nullcontext
from importlib import import_module
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
bpe = import_module("01_tokenizer.bpe")

IGNORE = -100  # targets the loss skips (lesson 07's loss masks, lesson 08's prompt tokens)


def token_byte_lengths(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """(vocab_size,) int64: bytes spelled by each token id of a `tokenizers.Tokenizer`; 0 for special tokens
    and for ids the tokenizer does not have (a model's vocab may be larger than its tokenizer's)."""
    vocab_size = vocab_size or tokenizer.get_vocab_size()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size and token not in special:
            lengths[i] = len(bpe.token_bytes(token))
    return lengths


@torch.no_grad()
def loss_sums(model, batches, token_bytes: torch.Tensor, autocast=None) -> torch.Tensor:
    """(3,) float64 on the model's device: summed target nats, target bytes and target tokens over batches of
    (x, y), x and y (B, T) as lesson 07's val batches. Sums, not means, so ranks can all_reduce them first;
    one pass gives both the validation loss (nats / tokens) and bpb (nats / (ln 2 bytes))."""
    device = next(model.parameters()).device  # model may be wrapped (DDP, torch.compile)
    token_bytes = token_bytes.to(device)
    total = torch.zeros(3, dtype=torch.float64, device=device)  # (nats, bytes, tokens)
    was_training = model.training
    model.eval()
    for x, y in batches:
        with autocast or nullcontext():
            logits, _ = model(x)  # (B, T, V)
        keep = y != IGNORE  # (B, T)
        # float32 log-softmax: bf16 logits lose precision over thousands of classes
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="none")  # (B*T,)
        total += torch.stack([nats.double().sum(), token_bytes[y.clamp(min=0)][keep].double().sum(), keep.sum().double()])
    model.train(was_training)
    return total


def bits_per_byte(model, batches, token_bytes: torch.Tensor, autocast=None) -> float:
    """bpb over batches of (x, y) (lesson 07's trainer all-reduces loss_sums itself, then divides the same way)."""
    total = loss_sums(model, batches, token_bytes, autocast)
    if total[1] == 0:
        raise ValueError("the targets spell no bytes (only special tokens): bits per byte is undefined")
    return (total[0] / (math.log(2) * total[1])).item()


def token_file_batches(path, seq_len: int, batch_size: int = 8, max_tokens: int | None = None, device="cpu"):
    """Non-overlapping windows of a uint16 token file (lesson 01's val.bin) as (x, y) batches, each (B, seq_len):
    every token after the first is a target exactly once (up to max_tokens)."""
    tokens = np.memmap(Path(path), dtype=np.uint16, mode="r")
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    starts = list(range(0, n - 1, seq_len))
    for i in range(0, len(starts), batch_size):
        rows = [torch.from_numpy(tokens[s : min(s + seq_len + 1, n)].astype(np.int64)) for s in starts[i : i + batch_size]]
        xy = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=IGNORE).to(device)  # (B, <= T + 1)
        yield xy[:, :-1].clamp(min=0), xy[:, 1:]  # the last window may be short: its padding is ignored


if __name__ == "__main__":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # A hand-sized tokenizer: 256 bytes + "Ġthe" + the special token </s>. "é" is two bytes (0xC3 0xA9).
    byte_chars = list(bpe.BYTE_TO_CHAR.values())
    vocab = {c: i for i, c in enumerate(byte_chars)} | {"Ġthe": 256}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.add_special_tokens(["</s>"])
    lengths = token_byte_lengths(tok)
    eos, the, e_acute = 257, 256, vocab[bpe.to_byte_chars("é")[0]]
    print(f"bytes: 'Ġthe' -> {lengths[the].item()}, </s> -> {lengths[eos].item()}, first byte of é -> {lengths[e_acute].item()}")

    class Uniform(torch.nn.Module):  # every token equally likely: each target costs ln V nats
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.zeros(*x.shape, len(lengths)), None

    y = torch.tensor([[the, e_acute, eos]])  # " the", one byte of é, </s>: 4 + 1 + 0 = 5 bytes, 3 targets
    bpb = bits_per_byte(Uniform(), [(torch.zeros_like(y), y)], lengths)
    by_hand = 3 * math.log(258) / (math.log(2) * 5)
    print(f"uniform model over 258 tokens: bpb = 3 ln 258 / (ln 2 * 5) = {by_hand:.4f}, computed {bpb:.4f}")
    assert lengths[the] == 4 and lengths[eos] == 0 and lengths[e_acute] == 1 and abs(bpb - by_hand) < 1e-5
    print("checked: token byte lengths (special tokens 0) and the bpb formula on a hand-worked example")
