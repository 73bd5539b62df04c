"""Checkpoints that a crash at any instant cannot damage: write a new directory, then swap it in by renames.

    out/ckpt_latest/model.safetensors   the weights and the model config (lesson 06's save_model)
    out/ckpt_latest/train_state.pt      plain dicts and tensors: step, optimizer, every rank's RNG, data position,
                                        the train config, the tokenizer's sha256 (torch.load(weights_only=True))
    save:  write ckpt_latest.tmp/ whole (fsynced); rename ckpt_latest -> .old; rename .tmp -> ckpt_latest; delete .old

A rename within one directory is atomic, so whenever the process dies one complete checkpoint exists, under
ckpt_latest or, between the two renames, ckpt_latest.old, which `find` returns. Nothing is pickled but plain
values, so loading runs no code. save_run gathers every rank's RNG and writes ckpt_latest (ckpt_best: hard links to
the same files); restore and check_resume put a run back exactly where it stopped. StopOnSignal turns SIGTERM and
SIGINT into a flag the loop reads at a step boundary. Left out on purpose: sharded checkpoints, async saving.

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
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
weights = import_module("06_model.weights")
lillm = import_module("06_model.model")

MODEL_FILE, STATE_FILE = weights.MODEL_FILE, "train_state.pt"


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


def save(ckpt_dir, model, train_state: dict, write_weights=None, like=None) -> None:
    """Write `model` (unwrapped: no DDP "module." prefix) and `train_state` as ckpt_dir, atomically.
    write_weights(directory), if given, writes the weight file(s) instead of model.safetensors
    (lesson 08 writes LoRA adapters only). like: a complete checkpoint directory whose files are
    hard-linked instead (ckpt_best from the ckpt_latest just written: nothing serialized twice)."""
    final = Path(ckpt_dir)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # a save that died half-way
    tmp.mkdir(parents=True)
    if like is not None:  # every save writes new files and never edits one in place, so sharing them is safe
        for f in Path(like).iterdir():
            try:
                os.link(f, tmp / f.name)
            except OSError:  # a filesystem without hard links
                shutil.copy2(f, tmp / f.name)
    elif write_weights is None:  # the tokenizer's sha256 goes into the weights' file too: lesson 06's load_pair checks it
        weights.save_model(model, tmp / MODEL_FILE, train_state.get("tokenizer_sha256"))
    else:
        write_weights(tmp)
    if like is None:
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
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)  # tensors read when used
    except Exception as e:  # the program's edge: any unreadable file becomes a one-line error
        raise _corrupt(path / STATE_FILE, e) from None
    missing = {"step", "optimizer", "rng", "data_position", "config", "tokenizer_sha256", "best_val_loss"} - set(state)
    if missing:
        raise CheckpointError(f"{path / STATE_FILE} lacks {', '.join(sorted(missing))}: not written by this trainer")
    return state


def load_model(ckpt_dir, device="cpu"):
    """The checkpoint's LilLM (float32, on device; LoRA adapters merged onto their base: lesson 06's one loader);
    CheckpointError if missing or unreadable."""
    path = _checked(ckpt_dir)
    try:
        return weights.load_model(path, device)
    except Exception as e:
        raise _corrupt(path, e) from None


def save_run(out_dir: Path, model, train_state: dict, run, best: bool, write_weights=None) -> None:
    """Every rank's RNG gathered into train_state["rng"], then rank 0 writes ckpt_latest (and ckpt_best)."""
    rngs = [None] * run.world
    if run.ddp:
        dist.all_gather_object(rngs, rng_state())  # each rank's RNG, for an exact resume
    else:
        rngs = [rng_state()]
    if run.master:
        save(out_dir / "ckpt_latest", model, dict(train_state, rng=rngs), write_weights)
        if best:
            save(out_dir / "ckpt_best", None, {}, like=out_dir / "ckpt_latest")


def broadcast_state(state: dict | None, run) -> dict:
    """The newest train state any rank read from its own disk, on every rank, with "source_rank" naming the
    rank it came from. Nodes need not share a filesystem: a node without the checkpoint gets it here, and
    where nodes hold different ones (global rank 0, the writer, can move between runs) the newest wins."""
    if not run.ddp:
        return dict(state, source_rank=0)
    steps = [None] * run.world
    dist.all_gather_object(steps, -1 if state is None else state["step"])
    source = max(range(run.world), key=lambda r: (steps[r], -r))  # the highest step; the lowest rank of those
    if steps[source] < 0:
        raise CheckpointError("--resume, but no node holds a checkpoint in its --out_dir; start a new run without --resume")
    box = [state]
    dist.broadcast_object_list(box, src=source)
    return dict(box[0], source_rank=source)


def broadcast_weights(model, source: int, run) -> None:
    """Every tensor of `model` from rank `source`, which loaded the checkpoint (DDP would copy rank 0's)."""
    if run.ddp:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=source)


def check_resume(state: dict, model_config, saved_config, tokenizer_sha256: str, where: str) -> None:
    """A resumed run must continue the same model on tokens of the same tokenizer."""
    if saved_config.vocab_size != model_config.vocab_size:
        raise CheckpointError(f"the checkpoint's model has vocab_size {saved_config.vocab_size}, "
                              f"the token files in {where} vocab_size {model_config.vocab_size}")
    if state["tokenizer_sha256"] != tokenizer_sha256:
        raise CheckpointError(f"the checkpoint was trained on tokens of tokenizer {state['tokenizer_sha256'][:12]}, "
                              f"the token files in {where} come from tokenizer {tokenizer_sha256[:12]}")
    if saved_config != model_config:
        raise CheckpointError(f"the checkpoint's model.safetensors ({saved_config}) does not match its train_state.pt ({model_config})")


def restore(state: dict | None, optimizer, run) -> tuple:
    """(step, best validation loss, data position) of a resumed run, its optimizer and this rank's RNG restored;
    (0, inf, 0) for a fresh one (state None)."""
    if state is None:
        return 0, float("inf"), 0
    optimizer.load_state_dict(state["optimizer"])
    if len(state["rng"]) == run.world:
        set_rng_state(state["rng"][run.rank])  # with another world size, dropout masks start afresh
    return state["step"], state["best_val_loss"], state["data_position"]


class StopOnSignal:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) set .received instead of killing the process; the training
    loop checks it at its next log step, saves and exits. A second Ctrl-C kills at once (a person who means
    it); a second SIGTERM does not (Slurm and torchrun both forward one, and the checkpoint comes first)."""

    def __enter__(self):
        self.received = []
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def handle(self, signum, frame):
        self.received.append(signal.Signals(signum).name)
        if signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if "SIGTERM" in self.received:  # a stopping run: a SIGTERM still on its way must not kill it on its way out
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
