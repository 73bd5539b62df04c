"""Byte-level BPE from scratch, merge for merge the same as Hugging Face `tokenizers`' BpeTrainer.

Byte-pair encoding (Sennrich et al., 2016, arXiv:1508.07909; byte-level: Radford et al., 2019, GPT-2):
start from the 256 bytes and repeatedly glue the most frequent adjacent pair into a new token.

    words   = count(pre_tokenize(corpus))                    # {"Ġthe": 24632, ...}, each word a list of ids
    repeat until |vocab| = vocab_size:
        (a, b) = argmax over pairs of  sum_w count(w) * #(a, b) in w,  ties -> the smallest (id_a, id_b)
        vocab += [a + b];  merges += [(a, b)];  replace (a, b) by a + b in every word

`train_plain` is that loop as written (read it first); `ByteLevelBPE.train` keeps the pair counts
instead of recounting them, 60-230x faster, to the same merges. Encoding replays the merges: in each
pre-token (pairs never cross one: "the," is "the" + ","), the lowest-rank pair first, leftmost first;
special tokens ("<s>") are cut out first. What this file copies from the library, exactly:
  ids         special tokens first (0..15), then the 256 byte characters sorted by code point
              ("!" = 16 ... "~" = 109, ..., "Ġ" = 236 is the space byte), then merges in order.
  ties        equal counts go to the pair with the smaller (id_a, id_b): ids, not strings.
  overlaps    "aaa" merges (a, a) once, at the left: "aaa" -> [aa, a], never [a, aa].
  same string two merges spelling one string keep its first id; a pair merged twice its last rank (notes.md §4).
Left out on purpose: min_frequency, limit_alphabet, dropout, continuing-subword prefixes, Unicode
normalization, parallelism. Pure Python, 1-2x the library's time on the default corpus (notes.md):
the library is the one to use (tokenizer.py), this file is the one to read.

Demo: python 01_tokenizer/bpe.py
"""

import heapq
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable
from importlib import import_module
from itertools import pairwise
from pathlib import Path

import regex  # the `re` module has no \p{L} / \p{N}

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# GPT-2's pre-tokenizer: contractions, letters with one optional leading space, numbers, other
# symbols, then whitespace. `\s+(?!\S)` leaves the last space of a run to the word after it.
# Trap: the library's regex engine (Oniguruma) and `regex` ship different Unicode versions: letters new in
# the newest one (4,657 code points) split differently; older ones split the same (tested; notes.md §3).
GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    """byte -> a printable character: bytes that print stay themselves, the other 68 go to 256 + n, so that every
    token is a readable, JSON-safe string: byte 0x20 (space) is "Ġ", 0x0A (newline) is "Ċ"."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


BYTE_TO_CHAR = bytes_to_unicode()  # int -> str
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}  # str -> int
_LATIN1_TO_CHAR = str.maketrans({chr(b): c for b, c in BYTE_TO_CHAR.items()})  # for str.translate


def to_byte_chars(piece: str) -> str:
    """'héllo' -> 'hÃ©llo': one character per UTF-8 byte (latin-1 turns bytes into code points 0..255)."""
    return piece.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_CHAR)


def token_bytes(token: str) -> bytes:
    """A token's bytes. A token spelled in byte characters is those bytes; any other (a special token
    such as "<s>" is, by luck, also spelled in them) is its UTF-8. This is the library's decoder rule."""
    if all(c in CHAR_TO_BYTE for c in token):
        return bytes(CHAR_TO_BYTE[c] for c in token)
    return token.encode("utf-8")


def pre_tokenize(text: str) -> list[str]:
    """Split like GPT-2 and spell each piece in byte characters: "I'm here" -> ['I', "'m", 'Ġhere']."""
    return [to_byte_chars(piece) for piece in GPT2_SPLIT.findall(text)]


def merge_word(word: list[int], a: int, b: int, new_id: int) -> list[tuple[tuple[int, int], int]]:
    """Replace each (a, b) in `word` by new_id in place, left to right; return the pair-count changes.

    Only the neighbours change: x a b y -> x N y removes (x, a) and (b, y), adds (x, N) and (N, y).
    The merged pair (a, b) itself gets no -1, as in the library: its count goes stale (notes.md §4).
    """
    changes = []  # ((left, right), +1 or -1)
    i = 0
    while i < len(word):
        if word[i] == a and i + 1 < len(word) and word[i + 1] == b:
            if i > 0:
                changes += [((word[i - 1], a), -1), ((word[i - 1], new_id), +1)]
            word[i : i + 2] = [new_id]
            if i + 1 < len(word):
                changes += [((b, word[i + 1]), -1), ((new_id, word[i + 1]), +1)]
        i += 1
    return changes


def count_words(texts: Iterable[str], special_tokens: list[str]) -> tuple[list[list[int]], list[int], list[str], dict]:
    """The start both trainers share: each distinct word as a list of ids, how often it occurs, and the
    initial vocabulary (special tokens, then all 256 byte characters by code point)."""
    raw = Counter()  # str -> int; count raw pieces (10^6), then spell each distinct one (10^4) in bytes once
    for text in texts:
        raw.update(GPT2_SPLIT.findall(text))
    id_to_token = list(dict.fromkeys(special_tokens))  # int -> str
    id_to_token += sorted(c for c in BYTE_TO_CHAR.values() if c not in id_to_token)
    vocab = {t: i for i, t in enumerate(id_to_token)}  # str -> int
    words = [[vocab[c] for c in to_byte_chars(piece)] for piece in raw]  # list[list[int]]; one-to-one map
    return words, list(raw.values()), id_to_token, vocab


def add_token(a: int, b: int, id_to_token: list[str], vocab: dict[str, int]) -> int:
    """The id of the token a + b: the next id, or the existing one if an earlier merge spelled it."""
    token = id_to_token[a] + id_to_token[b]
    if token not in vocab:
        vocab[token] = len(id_to_token)
        id_to_token.append(token)
    return vocab[token]


def train_plain(texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = ()) -> "ByteLevelBPE":
    """Learn merges until the vocabulary (special tokens + 256 bytes + merges) has vocab_size tokens or no
    pair is left. The loop of the module docstring, nothing more: each merge recounts every pair."""
    special_tokens = list(special_tokens)
    words, counts, id_to_token, vocab = count_words(texts, special_tokens)
    merges = []  # [(int, int)]: the pairs, in the order learned
    while len(vocab) < vocab_size:
        pair_counts = Counter()  # (int, int) -> int, from scratch
        for word, n in zip(words, counts):
            for pair in pairwise(word):
                pair_counts[pair] += n
        if not pair_counts:  # every word is a single token: nothing left to merge
            break
        a, b = min(pair_counts, key=lambda p: (-pair_counts[p], p))  # the most frequent; ties -> smallest ids
        new_id = add_token(a, b, id_to_token, vocab)
        merges.append((a, b))
        for word in words:
            merge_word(word, a, b, new_id)  # in place; the count changes it returns are for the fast trainer
    return ByteLevelBPE.from_id_merges(vocab, id_to_token, merges, special_tokens)


class ByteLevelBPE:
    """A trained byte-level BPE: `vocab` (token string -> id) and `merges` (in rank order)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], special_tokens: Iterable[str] = ()):
        self.vocab = vocab  # str -> int
        self.id_to_token = {i: t for t, i in vocab.items()}  # int -> str
        self.merges = merges  # [(str, str)], rank = position
        # (id_a, id_b) -> (rank, id of a + b); what encoding looks up for every adjacent pair
        self.ranks = {(vocab[a], vocab[b]): (r, vocab[a + b]) for r, (a, b) in enumerate(merges)}
        self.special_tokens = list(special_tokens)
        # Longest first, so that a special token that is a prefix of another cannot cut it short.
        alternatives = "|".join(map(regex.escape, sorted(self.special_tokens, key=len, reverse=True)))
        self.special_split = regex.compile(f"({alternatives})") if self.special_tokens else None
        self.cache = {}  # byte-char word -> ids; natural text repeats its words

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = ()) -> "ByteLevelBPE":
        """train_plain's merges, fast. train_plain recounts every pair of every word for every merge:
        O(merges x corpus). Here the counts are made once; a merge visits only the words that hold its
        pair and moves only the counts of the pairs touching it; a heap with lazy deletion finds the best."""
        special_tokens = list(special_tokens)
        words, counts, id_to_token, vocab = count_words(texts, special_tokens)
        pair_counts = Counter()  # (int, int) -> int; every adjacent pair, weighted by its word's count
        where = {}  # (int, int) -> set of word indices that contain (or contained) the pair
        for i, word in enumerate(words):
            for pair in pairwise(word):
                pair_counts[pair] += counts[i]
                where.setdefault(pair, set()).add(i)

        # A max-heap on (count, then smallest pair): heapq is a min-heap, so store -count.
        # Entries go stale when a count drops; they are fixed lazily, when they reach the top.
        # `seq` only keeps heapq from comparing two sets when count and pair are equal.
        heap = [(-pair_counts[p], p, seq, pos) for seq, (p, pos) in enumerate(where.items())]
        heapq.heapify(heap)
        seq = len(heap)
        merges = []  # [(int, int)]: the pairs, in the order learned
        while len(vocab) < vocab_size and heap:
            neg_count, pair, _, pos = heapq.heappop(heap)
            if -neg_count != pair_counts[pair]:  # stale: re-queue with the current count
                heapq.heappush(heap, (-pair_counts[pair], pair, seq, pos))
                seq += 1
                continue
            if -neg_count < 1:
                break
            a, b = pair
            new_id = add_token(a, b, id_to_token, vocab)
            merges.append(pair)

            # Merge in the words that had the pair, and move only the counts that changed.
            new_pos = {}  # pairs that gained occurrences -> the words where they did
            for i in pos:
                for p, delta in merge_word(words[i], a, b, new_id):
                    pair_counts[p] += delta * counts[i]
                    if delta > 0:
                        new_pos.setdefault(p, set()).add(i)
            for p, p_pos in new_pos.items():
                if pair_counts[p] > 0:
                    heapq.heappush(heap, (-pair_counts[p], p, seq, p_pos))
                    seq += 1
        return cls.from_id_merges(vocab, id_to_token, merges, special_tokens)

    @classmethod
    def from_id_merges(cls, vocab, id_to_token, merges, special_tokens) -> "ByteLevelBPE":
        """From a trainer's id pairs. A pair merged twice keeps its last rank, as in the library's map."""
        last_rank = {pair: r for r, pair in enumerate(merges)}
        ordered = sorted(last_rank, key=last_rank.get)
        return cls(vocab, [(id_to_token[a], id_to_token[b]) for a, b in ordered], special_tokens)

    @classmethod
    def from_tokenizer_json(cls, path) -> "ByteLevelBPE":
        """Read the vocab and merges from a `tokenizers` tokenizer.json (plain JSON, no library)."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
        specials = [t["content"] for t in data["added_tokens"] if t["special"]]
        return cls(data["model"]["vocab"], merges, specials)

    def _encode_word(self, word: str) -> list[int]:
        """Byte-char word -> ids: merge the lowest-rank pair, leftmost first, one occurrence at a time."""
        if word in self.cache:
            return self.cache[word]
        ids = [self.vocab[c] for c in word]
        while len(ids) > 1:
            # min over (rank, position): the library's heap of (rank, pos) in one line
            rank, i = min((self.ranks.get(pair, (float("inf"),))[0], i) for i, pair in enumerate(pairwise(ids)))
            if rank == float("inf"):
                break
            ids[i : i + 2] = [self.ranks[ids[i], ids[i + 1]][1]]
        self.cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """str -> ids; special tokens written in the text become their single ids."""
        chunks = self.special_split.split(text) if self.special_split else [text]
        ids = []
        for k, chunk in enumerate(chunks):  # odd positions are the special tokens the split kept
            if k % 2 == 1:
                ids.append(self.vocab[chunk])
            else:
                for word in pre_tokenize(chunk):
                    ids.extend(self._encode_word(word))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> str: the tokens' bytes joined, then decoded once. A token can hold half a character
        ("é" is two bytes), so bytes are joined first; 'replace' (like the library) for ids cut mid-character."""
        return b"".join(token_bytes(self.id_to_token[i]) for i in ids).decode("utf-8", errors="replace")


if __name__ == "__main__":
    corpus = import_module("01_tokenizer.corpus")
    docs = corpus.shakespeare_documents()
    train_docs, excerpt, specials = [], 0, ["<unk>", "<s>", "</s>"]
    for doc in docs:  # the first ~200 KB of the plays
        train_docs.append(doc)
        excerpt += len(doc)
        if excerpt > 200_000:
            break
    start = time.perf_counter()
    plain = train_plain(train_docs, vocab_size=512, special_tokens=specials)
    middle = time.perf_counter()
    bpe = ByteLevelBPE.train(train_docs, vocab_size=512, special_tokens=specials)
    assert plain.merges == bpe.merges and plain.vocab == bpe.vocab, "both trainers must learn the same merges"
    print(f"trained on {excerpt:,} characters: {len(bpe.vocab)} tokens, {len(bpe.merges)} merges, the same from "
          f"train_plain ({middle - start:.2f} s) and ByteLevelBPE.train ({time.perf_counter() - middle:.2f} s)")
    print("first merges:", ", ".join(f"{a!r}+{b!r}" for a, b in bpe.merges[:8]))
    text = "To be, or not to be, that is the question:</s>"
    ids = bpe.encode(text)
    print(f"{text!r} -> {len(ids)} ids {ids}")
    print("as tokens:", [bpe.id_to_token[i] for i in ids])
    assert bpe.decode(ids) == text, "decode(encode(s)) must give s back"
    print("checked: decode(encode(s)) == s; tests/test_01_tokenizer.py checks the merges against the library")
