"""A LilLM on disk: one safetensors file holding the weights, with the model's config as JSON metadata.

    model.safetensors = { parameter name -> tensor }   the tied output.weight stored once, as tok_embeddings.weight
                        + metadata {"lillm_config": json of ModelConfig}

No pickled classes: their module paths start with digits, and safetensors cannot run code when loaded.
Lessons 07 and 08 put this file inside their checkpoint directories; hf.py writes the same format under
Hugging Face's names, and load_model reads either.

Demo: python 06_model/weights.py
"""

import json
import os
import sys
from importlib import import_module
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
lillm = import_module("06_model.model")

TIED = "output.weight"  # the same tensor as tok_embeddings.weight


def write_safetensors(tensors: dict, path, metadata: dict) -> None:
    """safetensors' save_file, atomically: a temp file, then os.replace, so a crash mid-write never leaves a
    half-written file under the real name. The library creates its files 0600; they get the umask's mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    umask = os.umask(0)  # reading the umask means setting it; put it back at once
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save_model(model, path) -> None:
    """Write model.state_dict() (the tied matrix once) and its config to `path`, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != TIED}
    if any(v.dtype == torch.int8 for v in state.values()):
        raise ValueError("this model was quantized to int8 for decoding (06_model/int8.py): save the float model "
                         "and quantize after load_model")
    write_safetensors(state, path, {"lillm_config": json.dumps(model.config.to_dict())})


def load_model(path, device="cpu"):
    """A float32 LilLM from a save_model file, a directory holding model.safetensors (the trainer's
    out/ckpt_*/), or a Hugging Face Llama export directory (config.json)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        return import_module("06_model.hf").import_hf(path, device)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train one (`python 07_pretrain_ddp/train.py` pretrains, "
                                "`python 08_sft/sft.py` makes a chat model of it) or import a Llama export with `python 06_model/hf.py import`")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta, state = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-save it or use another checkpoint") from None
    if "lillm_config" not in meta:
        raise ValueError(f"{path} has no 'lillm_config' metadata: not written by save_model "
                         "(for a Hugging Face export, pass its directory)")
    try:
        config = lillm.ModelConfig(**json.loads(meta["lillm_config"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its config is not a valid ModelConfig ({e})") from None
    return build_from_state(config, state, device, str(path))


def build_from_state(config, state: dict, device="cpu", source: str = "checkpoint"):
    """A LilLM with `config` holding exactly `state` (without the tied output.weight); a one-line error otherwise."""
    model = lillm.LilLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != TIED}
    got = {k: v.shape for k, v in state.items()}
    if expected != got:
        bad = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        detail = ", ".join(f"{k}: config {tuple(expected.get(k, ()))} vs weights {tuple(got.get(k, ()))}" for k in bad[:3])
        raise ValueError(f"{source}: the weights do not match its config ({len(bad)} tensors differ; {detail}); "
                         "the config and the weights must come from the same run")
    # Loaded into float32 parameters (a bf16 checkpoint upcasts exactly); model.to(dtype) would also round the
    # float32 RoPE table, so lower precision is left to autocast.
    model.to(device).load_state_dict({**state, TIED: state["tok_embeddings.weight"]})
    return model


if __name__ == "__main__":
    import tempfile

    torch.manual_seed(0)
    model = lillm.LilLM(lillm.ModelConfig(vocab_size=256, d_model=64, n_layers=2, q_heads=4, kv_heads=2))
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, Path(tmp) / "model.safetensors")
        size = (Path(tmp) / "model.safetensors").stat().st_size
        loaded = load_model(tmp)
    same = all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    print(f"{model.num_params():,} parameters -> {size:,} bytes (4 per parameter, the tied matrix once, plus the header)")
    assert same and loaded.output.weight is loaded.tok_embeddings.weight
    print("checked: the loaded model holds the same tensors, and its output head is tied to the embedding again")
