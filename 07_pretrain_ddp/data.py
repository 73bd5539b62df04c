"""Training windows from lesson 01's uint16 token files: memory-mapped, epoch-shuffled, split across ranks.

A token file of N tokens holds n = (N - 1) // T windows of T + 1 tokens; window i starts at i T
(inputs are its first T tokens, targets the last T, so neighbours share one token). All ranks walk
one global stream of window ids, every epoch a fresh permutation drawn from (seed, epoch):

    stream  = perm(seed, 0) ++ perm(seed, 1) ++ ...         each perm is a permutation of 0..n-1
    rank r, micro-batch k, world size W, batch B  reads  stream[(k W + r) B : (k W + r + 1) B]

so the W ranks of a micro-batch read disjoint parts of the stream, every window is read exactly once
per epoch, nothing is drawn with replacement (a micro-batch that straddles two epochs may hold one
window from each), and the whole state is one integer: how many windows of the stream the job has
consumed. That integer goes into the
checkpoint; it does not depend on B or W, so a run may resume with another batch size or world size.

Left out on purpose: document masking (a window can span two documents joined by </s>, as in GPT
pretraining), random window offsets per epoch, sharded files.

Demo: python 07_pretrain_ddp/data.py
"""

import sys
from importlib import import_module
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
prepare = import_module("01_tokenizer.prepare")
tokenizer_lib = import_module("01_tokenizer.tokenizer")


def epoch_order(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of window ids for one epoch, the same on every rank and every run."""
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


class WindowStream:
    """Window ids at positions [start, start + count) of the epoch-shuffled stream."""

    def __init__(self, n_windows: int, seed: int):
        assert n_windows > 0, "the token file is shorter than one window: lower --seq_len or use more data"
        self.n_windows, self.seed = n_windows, seed
        self._epoch, self._order = -1, None  # one epoch's permutation, cached

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(self.n_windows, self.seed, epoch)
        return self._order

    def take(self, start: int, count: int) -> np.ndarray:
        ids = []
        while count > 0:
            epoch, offset = divmod(start, self.n_windows)
            part = self.order(epoch)[offset : offset + count]
            ids.append(part)
            start, count = start + len(part), count - len(part)
        return np.concatenate(ids)


class TokenWindows:
    """A uint16 token file through np.memmap: only the windows asked for are read from disk."""

    def __init__(self, path, n_tokens: int, seq_len: int, vocab_size: int):
        self.tokens = np.memmap(Path(path), dtype=np.uint16, mode="r", shape=(n_tokens,))
        self.path, self.seq_len, self.vocab_size = Path(path), seq_len, vocab_size
        self.n_windows = (n_tokens - 1) // seq_len

    def batch(self, ids: np.ndarray, device: torch.device):
        """Window ids (B,) -> inputs, targets (B, T) int64 on device."""
        T = self.seq_len
        rows = np.stack([self.tokens[i * T : i * T + T + 1] for i in ids]).astype(np.int64)  # (B, T + 1)
        if rows.max() >= self.vocab_size:  # checked here, on the host: in the model it would stall a GPU each step
            raise prepare.DataError(f"{self.path} holds token id {rows.max()}, beyond vocab_size {self.vocab_size}: "
                                    "a corrupt file or another tokenizer's; rebuild it with 01_tokenizer/prepare.py")
        xy = torch.from_numpy(rows)
        if device.type == "cuda":  # pinned memory lets the copy overlap with the GPU's work
            xy = xy.pin_memory().to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]


class RankSampler:
    """What one rank reads: its B windows of each micro-batch. `position` is the global stream position."""

    def __init__(self, stream: WindowStream, batch_size: int, rank: int, world_size: int, position: int = 0):
        self.stream, self.B, self.rank, self.W = stream, batch_size, rank, world_size
        self.position = position  # windows consumed by all ranks together: the data state of a checkpoint

    def next_ids(self) -> np.ndarray:
        ids = self.stream.take(self.position + self.rank * self.B, self.B)
        self.position += self.B * self.W
        return ids


def token_windows(data_dir, meta: dict, seq_len: int) -> tuple:
    """(train, val) TokenWindows over lesson 01's token files; a DataError if either is shorter than a window."""
    train, val = (TokenWindows(Path(data_dir) / f"{s}.bin", meta[f"{s}_tokens"], seq_len, meta["vocab_size"]) for s in ("train", "val"))
    if min(train.n_windows, val.n_windows) < 1:
        raise prepare.DataError(f"train.bin or val.bin in {data_dir} is shorter than one window of max_seq_len + 1 = {seq_len + 1} tokens")
    return train, val


def eval_batches(val: TokenWindows, eval_tokens: int, batch_size: int, run) -> list:
    """This rank's validation batches, loaded once: the same windows at every evaluation, whatever the batch
    size and world size, evenly spread over val.bin (not its first documents only), dealt to the ranks like cards."""
    n_eval = max(1, min(val.n_windows, eval_tokens // val.seq_len))
    ids = np.linspace(0, val.n_windows - 1, n_eval).round().astype(np.int64)[run.rank :: run.world]
    return [val.batch(ids[i : i + batch_size], run.device) for i in range(0, len(ids), batch_size)]


def build_token_files(cfg: dict) -> None:
    """Lesson 01's tokenizer and token files for cfg, when missing (run through stage.build_once)."""
    if not (Path(cfg["data_dir"]) / "meta.json").exists():  # present: load_data checks it
        print(f"no token files in {cfg['data_dir']}: building them with lesson 01 from corpus {cfg['corpus']!r}")
        prepare.ensure_data(cfg["data_dir"], cfg["tokenizer"], cfg["corpus"])


def load_data(cfg: dict) -> dict:
    """Lesson 01's meta dict for the token files build_token_files made, checked against the tokenizer."""
    meta = prepare.load_meta(cfg["data_dir"])
    tokenizer_lib.load_tokenizer(cfg["tokenizer"])  # a one-line DataError if it is missing or unreadable
    prepare.check_tokenizer(meta, cfg["tokenizer"], cfg["data_dir"])
    return meta


if __name__ == "__main__":
    stream = WindowStream(n_windows=10, seed=0)
    ranks = [RankSampler(stream, batch_size=2, rank=r, world_size=2) for r in range(2)]
    stream_read = []
    for k in range(5):  # 5 micro-batches x 2 ranks x 2 windows = 2 epochs of 10 windows
        ids = [s.next_ids() for s in ranks]
        print(f"micro-batch {k}: rank 0 reads {ids[0]}, rank 1 reads {ids[1]}")
        stream_read += [*ids[0], *ids[1]]
    assert sorted(stream_read[:10]) == sorted(stream_read[10:]) == list(range(10))
    print("checked: each epoch reads each of the 10 windows exactly once, micro-batch 2 straddling two epochs")
