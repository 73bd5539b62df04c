"""A LilLM on disk: one safetensors file holding the weights, with the model's config as JSON metadata.

    model.safetensors = { parameter name -> tensor }   the tied output.weight stored once, as tok_embeddings.weight
                        + metadata {"lillm_config": json of ModelConfig, "tokenizer_sha256": of the tokenizer it reads}

No pickle (module paths start with digits; safetensors cannot run code). `load_model` reads every checkpoint kind:
this file or a directory holding it (lesson 07's out/ckpt_*/), a Hugging Face export (hf.py), lesson 08's LoRA
adapters (merged into their base). `load_pair` adds the tokenizer, checked to belong to the model; `chat_template`
tells a chat model; `one_line_errors` is every command's `error: ...` line (exit code 2).

Demo: python 06_model/weights.py
"""

import hashlib
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
commands = import_module("01_tokenizer.commands")
tokenizer_lib = import_module("01_tokenizer.tokenizer")
lillm = import_module("06_model.model")

TIED = "output.weight"  # the same tensor as tok_embeddings.weight
MODEL_FILE, ADAPTER_FILE = "model.safetensors", "adapter.safetensors"
HOW_TO_GET_ONE = ("train one (`python 07_pretrain_ddp/train.py` pretrains, `python 08_sft/sft.py` makes a chat model "
                  "of it) or import a Llama export with `python 06_model/hf.py import`")


def write_safetensors(tensors: dict, path, metadata: dict) -> None:
    """safetensors' save_file, atomically (lesson 01's atomic_write: a crash never leaves half a file under the
    real name). The library creates its files 0600; they get the umask's mode, as any other file."""
    with commands.atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        umask = os.umask(0)  # reading the umask means setting it; put it back at once
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)


def read_safetensors(path, key: str, tensors: bool = True) -> tuple:
    """(json metadata under `key`, tensors (none if not `tensors`), all metadata) of a safetensors file of ours;
    a one-line ValueError if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, state = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-save it or use another checkpoint") from None
    if key not in meta:
        raise ValueError(f"{path} has no {key!r} metadata: not written by lilLM (for a Hugging Face export, pass its directory)")
    return json.loads(meta[key]), state, meta


def float_state(model) -> dict:
    """model.state_dict() without the tied head, to be written; refused in one line for a model only fit to run."""
    state = {k: v for k, v in model.state_dict().items() if k != TIED}
    if any(v.dtype == torch.int8 for v in state.values()):
        raise ValueError("this model was quantized to int8 for decoding (06_model/int8.py): save or export the float "
                         "model and quantize after load_model (GGUF has its own 8-bit blocks: --type q8_0)")
    if any(".lora_" in k for k in state):
        raise ValueError("this model has unmerged LoRA adapters: merge them first (08_sft/lora.py merge_lora), "
                         "or pass the adapter checkpoint, which load_model reads merged")
    return state


def save_model(model, path, tokenizer_sha256: str | None = None) -> None:
    """Write model.state_dict() (the tied matrix once), its config and its tokenizer's sha256 to `path`, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in float_state(model).items()}
    meta = {"lillm_config": json.dumps(model.config.to_dict())}
    write_safetensors(state, path, meta | ({"tokenizer_sha256": tokenizer_sha256} if tokenizer_sha256 else {}))


def fingerprint(state: dict) -> str:
    """A hash of a model's weights (its state_dict without the tied head): adapters are never loaded onto another base."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        if ".lora_" not in k and k != TIED:
            h.update(k.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def locate(path) -> tuple[str, Path]:
    """What a checkpoint path holds: ("hf", the export's dir), ("lora", adapter.safetensors) or ("model", the file)."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return "hf", path
    if path.name == ADAPTER_FILE or (path / ADAPTER_FILE).is_file():
        return "lora", path / ADAPTER_FILE if path.is_dir() else path
    return "model", path / MODEL_FILE if path.is_dir() else path


def load_model(path, device="cpu", base=None):
    """A float32 LilLM from any checkpoint kind (module docstring); FileNotFoundError or ValueError in one line.
    base: for LoRA adapters, their base model, if not where they recorded it."""
    kind, file = locate(path)
    if kind == "hf":
        return import_module("06_model.hf").import_hf(file, device)
    if kind == "lora":
        return load_adapters_merged(file, device, base)
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}: {HOW_TO_GET_ONE}")
    config, state, _ = read_safetensors(file, "lillm_config")
    try:
        config = lillm.ModelConfig(**config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: its config is not a valid ModelConfig ({e})") from None
    return build_from_state(config, state, device, str(file))


def load_adapters_merged(path, device="cpu", base=None):
    """Lesson 08's LoRA adapters folded into their base: W' = W + (alpha / r) B A per adapted matrix."""
    meta, adapters, _ = read_safetensors(path, "lillm_lora")
    model = load_model(base or meta["base"], device)
    state = model.state_dict()
    if fingerprint(state) != meta["base_fingerprint"]:
        raise ValueError(f"{path}: these adapters were trained on another base ({meta['base']}); pass that one")
    with torch.no_grad():
        for name in [k.removesuffix(".lora_A") for k in adapters if k.endswith(".lora_A")]:
            b, a = adapters[name + ".lora_B"].to(device), adapters[name + ".lora_A"].to(device)
            state[name + ".weight"] += (meta["alpha"] / meta["rank"]) * (b @ a)
    return model


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


def recorded_tokenizer(path, base=None) -> str | None:
    """The sha256 of the tokenizer a checkpoint was trained with, if it records one (adapters: their base's)."""
    kind, file = locate(path)
    if kind == "hf" or not file.is_file():
        return None  # a Hugging Face export carries its own tokenizer.json
    if kind == "lora":
        return recorded_tokenizer(base or read_safetensors(file, "lillm_lora", tensors=False)[0]["base"])
    return read_safetensors(file, "lillm_config", tensors=False)[2].get("tokenizer_sha256")


def find_tokenizer(checkpoint, given=None) -> Path:
    """`given` if any; else a tokenizer.json beside the checkpoint (exports carry one); else lesson 01's default."""
    if given:
        return Path(given)
    path = Path(checkpoint)
    beside = (path if path.is_dir() else path.parent) / "tokenizer.json"
    return beside if beside.is_file() else Path(tokenizer_lib.DEFAULT_TOKENIZER_PATH)


def load_pair(checkpoint, tokenizer=None, device="cpu", base=None) -> tuple:
    """(model, tokenizer, tokenizer path) of a checkpoint, checked to belong together: every id the tokenizer gives
    fits the model's vocabulary, and it is the tokenizer the checkpoint recorded (when it records one)."""
    model = load_model(checkpoint, device, base)
    path = find_tokenizer(checkpoint, tokenizer)
    tok = tokenizer_lib.load_tokenizer(path)  # a one-line DataError if missing or unreadable
    recorded = recorded_tokenizer(checkpoint, base)
    if recorded and recorded != tokenizer_lib.tokenizer_sha256(path):
        raise ValueError(f"{path} is not the tokenizer {checkpoint} was trained with (sha256 {recorded[:12]}); "
                         "pass that one with --tokenizer")
    if tok.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"{path} has {tok.get_vocab_size()} tokens, more than the model's vocab_size "
                         f"{model.config.vocab_size}: not this checkpoint's tokenizer (pass --tokenizer)")
    return model, tok, path


def chat_template(checkpoint) -> str | None:
    """The chat template a checkpoint carries, or None for a base model: a Hugging Face export's in its
    tokenizer_config.json, a training run's in chat_template.jinja beside its checkpoints (lesson 08 writes both)."""
    path = Path(checkpoint)
    here = path if path.is_dir() else path.parent
    config = here / "tokenizer_config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("chat_template")
    for where in (here, here.parent):
        if (where / "chat_template.jinja").is_file():
            return (where / "chat_template.jinja").read_text()
    return None


one_line_errors = commands.one_line_errors  # lesson 01's: `error: <one line>`, exit code 2


if __name__ == "__main__":
    import tempfile

    torch.manual_seed(0)
    model = lillm.LilLM(lillm.ModelConfig(vocab_size=256, d_model=64, n_layers=2, q_heads=4, kv_heads=2))
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, Path(tmp) / MODEL_FILE)
        size = (Path(tmp) / MODEL_FILE).stat().st_size
        loaded = load_model(tmp)
    same = all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    print(f"{model.num_params():,} parameters -> {size:,} bytes (4 per parameter, the tied matrix once, plus the header)")
    assert same and loaded.output.weight is loaded.tok_embeddings.weight
    print("checked: the loaded model holds the same tensors, and its output head is tied to the embedding again")
