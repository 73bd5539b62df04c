"""Checkpoints that a crash at any instant cannot damage: write a new directory, then swap it in by renames.

    out/ckpt_latest/model.safetensors   the weights and the model config (lesson 06's save_model)
    out/ckpt_latest/train_state.pt      plain dicts and tensors: step, optimizer, every RNG, data position,
                                        the train config, the tokenizer's sha256 (torch.load(weights_only=True))

A save writes ckpt_latest.tmp/ completely (and fsyncs it), then

    rename ckpt_latest -> ckpt_latest.old;   rename ckpt_latest.tmp -> ckpt_latest;   delete ckpt_latest.old

A rename within one directory is atomic, so whenever the process dies, one complete checkpoint exists
under ckpt_latest or, between the two renames, under ckpt_latest.old, which `find` then returns.
Nothing here is pickled but plain Python values (weights_only=True refuses anything else), so a
checkpoint cannot run code when loaded and never names a class whose module path starts with a digit.

StopOnSignal turns SIGTERM (a preempted job) and SIGINT (Ctrl-C) into a flag that the training loop
reads at a step boundary, so that a stopped run saves a consistent checkpoint instead of dying mid-step.
Left out on purpose: sharded (per-rank) checkpoints, which FSDP-sized models need; async saving.

Demo: python 07_pretrain_ddp/checkpoint.py
"""

import os
import random
import shutil
import signal
import sys
from importlib import import_module
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
lillm = import_module("06_model.model")

MODEL_FILE, STATE_FILE = "model.safetensors", "train_state.pt"


class CheckpointError(Exception):
    """A checkpoint that is missing or unreadable; str() is one line."""


def rng_state() -> dict:
    """Every RNG a training step may draw from (dropout, sampling), as plain values and tensors."""
    np_state = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key", "pos"}, "has_gauss", "gauss"}
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))  # arrays are not weights_only-safe
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's current device
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"], state=dict(state["numpy"]["state"]))
    np_state["state"]["key"] = np_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a directory's fd too: fsync makes its renames durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(ckpt_dir, model, train_state: dict, write_weights=None) -> None:
    """Write `model` (unwrapped: no DDP "module." prefix) and `train_state` as ckpt_dir, atomically.
    write_weights(directory), if given, writes the weight file(s) instead of model.safetensors
    (lesson 08 writes LoRA adapters only)."""
    final = Path(ckpt_dir)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # a save that died half-way
    tmp.mkdir(parents=True)
    if write_weights is None:
        lillm.save_model(model, tmp / MODEL_FILE)
    else:
        write_weights(tmp)
    torch.save(train_state, tmp / STATE_FILE)
    for path in (*sorted(tmp.iterdir()), tmp):
        _fsync(path)
    if old.exists():  # a swap died after its first rename: old is the only complete copy, so restore it first
        if final.exists():
            shutil.rmtree(old)
        else:
            old.rename(final)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def find(ckpt_dir) -> Path | None:
    """The complete checkpoint for ckpt_dir: itself, or the aside copy a swap left if it died mid-way."""
    final = Path(ckpt_dir)
    old = final.with_name(final.name + ".old")
    return final if final.is_dir() else old if old.is_dir() else None


def _checked(ckpt_dir) -> Path:
    path = find(ckpt_dir)
    if path is None:
        raise CheckpointError(f"no checkpoint at {ckpt_dir}; start a new run without --resume")
    return path


def _corrupt(path: Path, e: Exception) -> CheckpointError:
    reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return CheckpointError(f"checkpoint {path} is corrupt or unreadable ({reason}); delete it or resume from another --out_dir")


def load_state(ckpt_dir) -> dict:
    """train_state.pt of the checkpoint `find` picks; CheckpointError if missing or unreadable."""
    path = _checked(ckpt_dir)
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # the program's edge: any unreadable file becomes a one-line error
        raise _corrupt(path / STATE_FILE, e) from None
    missing = {"step", "optimizer", "rng", "data_position", "config", "tokenizer_sha256", "best_val_loss"} - set(state)
    if missing:
        raise CheckpointError(f"{path / STATE_FILE} lacks {', '.join(sorted(missing))}: not written by this trainer")
    return state


def load_model(ckpt_dir, device="cpu"):
    """The checkpoint's LilLM (float32, on device); CheckpointError if missing or unreadable."""
    path = _checked(ckpt_dir)
    try:
        return lillm.load_model(path / MODEL_FILE, device)
    except Exception as e:
        raise _corrupt(path / MODEL_FILE, e) from None


class StopOnSignal:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) set .received instead of killing the process; the training
    loop checks it at a step boundary, saves and exits. A second Ctrl-C kills at once."""

    def __enter__(self):
        self.received = []
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        self.received.append(signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    import tempfile

    torch.manual_seed(0)
    model = lillm.LilLM(lillm.ModelConfig(vocab_size=64, d_model=32, n_layers=1, q_heads=4, kv_heads=2))
    state = {"step": 1, "optimizer": {}, "rng": [rng_state()], "data_position": 0, "config": {},
             "tokenizer_sha256": "", "best_val_loss": 9.9}
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp) / "ckpt_latest"
        save(where, model, state)
        where.rename(where.with_name("ckpt_latest.old"))  # as if the next save died between its two renames
        print(f"a save that died between its renames leaves {sorted(p.name for p in Path(tmp).iterdir())}; find() -> {find(where).name}")
        assert load_state(where)["step"] == 1 and torch.equal(load_model(where).output.weight, model.output.weight)
        save(where, model, dict(state, step=2))
        print(f"the next save restores and replaces it: {sorted(p.name for p in Path(tmp).iterdir())}, step {load_state(where)['step']}")
        assert load_state(where)["step"] == 2 and not where.with_name("ckpt_latest.old").exists()
    print("checked: a complete checkpoint survives a crash mid-swap, and the next save cleans up")
