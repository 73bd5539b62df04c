"""The tokenizer: byte-level BPE with 8192 tokens, trained with Hugging Face `tokenizers`.

    text -> split GPT-2 style -> each piece as UTF-8 bytes -> merge pairs by rank -> ids

`bpe.py` is the same algorithm in plain Python, merge for merge equal to this library's trainer.
The choices (notes.md §2-§5 say why): ByteLevel pre-tokenizer without a prefix space; the 256 bytes
always in the vocabulary, so nothing is ever <unk> and decode(encode(s)) == s for any string;
specials <unk>=0, <s>=1, </s>=2 (end of document, EOT_ID), <r0>..<r12>=3..15 (chat roles), each
written in a text encoding to its one id; no post-processor: encode() adds nothing. Saved as one
tokenizer.json that `tokenizers` and transformers' `PreTrainedTokenizerFast` load to the same ids.
Left out on purpose: normalization (NFC etc.), byte fallback, a chat template.

Demo (trains data/tokenizer.json on the default corpus): python 01_tokenizer/tokenizer.py
"""

import argparse
import importlib.util
import sys
import time
from collections.abc import Iterable
from importlib import import_module
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
commands = import_module("01_tokenizer.commands")
corpus = import_module("01_tokenizer.corpus")

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<r{i}>" for i in range(13)]  # ids 0..15, in this order
UNK_ID, BOS_ID, EOT_ID = 0, 1, 2  # EOT_ID: "</s>", appended to every document in the token files
DEFAULT_VOCAB_SIZE = 8192  # 2**13
MAX_VOCAB_SIZE = 65536  # the token files store uint16
DEFAULT_TOKENIZER_PATH = "data/tokenizer.json"
# Train on at most this many characters: plenty for 8192 tokens, hours less on OpenWebText, and far below
# ~100 GB, where the library's 32-bit pair counts overflow (notes.md §4). The default corpus is 5 M characters.
DEFAULT_MAX_CHARS = 2_000_000_000


def check_vocab_size(vocab_size: int):
    """DataError unless the specials and the 256 bytes fit and every id fits the uint16 token files."""
    smallest = len(SPECIAL_TOKENS) + 256
    if not smallest <= vocab_size <= MAX_VOCAB_SIZE:
        raise commands.DataError(f"vocab size {vocab_size} is outside [{smallest}, {MAX_VOCAB_SIZE}] "
                               f"({len(SPECIAL_TOKENS)} specials + 256 bytes at least; ids must fit the uint16 token "
                               f"files); fix: pass --vocab_size in that range")


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE pipeline: GPT-2 split without prefix space, byte-level decoder."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))  # never used: every byte is in the vocabulary
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(docs: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, show_progress: bool = False,
                    max_chars: int | None = DEFAULT_MAX_CHARS) -> Tokenizer:
    """Train on the documents, up to the one that reaches max_chars (None: all of them). Streamed: the library
    keeps only the word counts in memory, never the text."""
    check_vocab_size(vocab_size)
    seen = {"docs": 0, "chars": 0}

    def counted(docs):  # counts what was fed, to tell an empty corpus apart and to stop at max_chars
        for doc in docs:
            seen["docs"] += 1
            seen["chars"] += len(doc)
            yield doc
            if max_chars is not None and seen["chars"] >= max_chars:
                return

    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        min_frequency=0,
        show_progress=show_progress,
    )
    tok.train_from_iterator(counted(docs), trainer)
    if seen["docs"] == 0:
        raise commands.DataError("the corpus has no text (no non-empty document); fix: point --corpus at files with text")
    specials = [tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS))]
    assert specials == SPECIAL_TOKENS, f"special tokens must be ids 0..15, got {specials}"
    return tok


def save_tokenizer(tok: Tokenizer, path):
    """Write tokenizer.json atomically: complete or not at all."""
    with commands.atomic_write(path) as tmp:
        tok.save(str(tmp))


def load_tokenizer(path=DEFAULT_TOKENIZER_PATH) -> Tokenizer:
    """Tokenizer.from_file, with a one-line DataError for a missing or unreadable file."""
    if not Path(path).is_file():
        raise commands.DataError(f"no tokenizer at {path}; fix: python 01_tokenizer/tokenizer.py --out {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for malformed JSON
        reason = str(e).splitlines()[0][:120]
        raise commands.DataError(f"{path} is not a tokenizer.json ({reason}); fix: delete it and retrain") from None


def load_hf_tokenizer(path=DEFAULT_TOKENIZER_PATH):
    """The same file as a transformers tokenizer (ids identical to load_tokenizer's)."""
    from transformers import PreTrainedTokenizerFast  # only needed to hand the tokenizer to transformers

    load_tokenizer(path)  # same checks, same errors
    return PreTrainedTokenizerFast(tokenizer_file=str(path), unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def token_byte_lengths(tok: Tokenizer, vocab_size: int | None = None):
    """(vocab_size,) int64 tensor: the UTF-8 bytes each token id spells (bpe.token_bytes: "Ġthe" is b" the"); 0 for
    special tokens, which spell no text, and for ids past the tokenizer's (a model's vocab may be larger). Bits per
    byte divide by these (lesson 07's validation); decode([id]) would miscount a token that ends mid-character."""
    import torch  # only here: the tokenizer itself needs no torch

    token_bytes = import_module("01_tokenizer.bpe").token_bytes
    vocab_size = vocab_size or tok.get_vocab_size()
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    for token, i in tok.get_vocab().items():
        if i < vocab_size and token not in special:
            lengths[i] = len(token_bytes(token))
    return lengths


def tokenizer_sha256(path=DEFAULT_TOKENIZER_PATH) -> str:
    """sha256 of tokenizer.json's bytes: meta.json and checkpoints record it to catch a swapped tokenizer."""
    return commands.sha256_file(path)


def train(corpus_spec="shakespeare", vocab_size: int = DEFAULT_VOCAB_SIZE, out=DEFAULT_TOKENIZER_PATH,
          cache_dir=corpus.DEFAULT_CACHE_DIR, show_progress: bool = False,
          max_chars: int | None = DEFAULT_MAX_CHARS, force: bool = False) -> Tokenizer:
    """Train on a corpus spec and save to `out`; on any error the file at `out` is left as it was. A different
    tokenizer already at `out` is kept unless force=True: the files made with it record its sha256."""
    tok = train_tokenizer(corpus.documents(corpus_spec, cache_dir), vocab_size, show_progress, max_chars)
    if Path(out).exists() and not force and Tokenizer.from_str(Path(out).read_text()).to_str() != tok.to_str():
        raise commands.DataError(f"{out} already holds a different tokenizer; fix: pass --force to replace it "
                               "(then rerun prepare.py for its token files) or choose another --out")
    save_tokenizer(tok, out)
    return tok


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer (tokenizer.json).")
    corpus.add_corpus_flags(parser)
    parser.add_argument("--vocab_size", "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help="tokens, specials included (default 8192)")
    parser.add_argument("--out", default=DEFAULT_TOKENIZER_PATH, help="where to write tokenizer.json")
    parser.add_argument("--force", action="store_true", help="replace a different tokenizer already at --out")
    parser.add_argument("--max_chars", "--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                        help="train on the corpus' first documents up to this many characters (default 2e9; 0: all)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    tok = train(args.corpus, args.vocab_size, args.out, args.cache_dir, True, args.max_chars or None, args.force)
    seconds = time.perf_counter() - start
    print(f"trained {tok.get_vocab_size()} tokens on {corpus.describe(args.corpus)} in {seconds:.1f} s -> {args.out}")
    text = "To be, or not to be: that is the question.</s>"
    ids = tok.encode(text).ids
    print(f"{text!r} -> {len(ids)} tokens {tok.encode(text).tokens}")
    assert tok.decode(ids, skip_special_tokens=False) == text, "decode(encode(s)) must give s back"
    print(f"checked: decode(encode(s)) == s (sha256 of {args.out}: {tokenizer_sha256(args.out)[:12]})")
    if importlib.util.find_spec("transformers") is not None:  # a test dependency, optional here
        hf_ids = load_hf_tokenizer(args.out).encode(text)
        assert hf_ids == ids, f"transformers gives {hf_ids}, tokenizers {ids}"
        print(f"checked: transformers' PreTrainedTokenizerFast loads {args.out} to the same ids")


if __name__ == "__main__":
    commands.exit_on_data_error(main)
