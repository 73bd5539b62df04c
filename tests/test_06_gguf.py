"""Lesson 06: the GGUF export, read back by the format's own reader and run by transformers' GGUF loader.

References: gguf's GGUFReader and dequantizer (llama.cpp's gguf-py) for the file itself; transformers'
`from_pretrained(dir, gguf_file=...)` (model and tokenizer) for what llama.cpp-compatible loaders compute;
llama.cpp itself through llama-cpp-python, only where that is installed (it compiles llama.cpp: ~10 minutes).

Run: python -m pytest tests/test_06_gguf.py -q
"""

import copy
import json
from importlib import import_module

import gguf
import jinja2
import numpy as np
import pytest
import torch
from conftest import assert_close
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

G = import_module("06_model.gguf")
lillm = import_module("06_model.model")
weights = import_module("06_model.weights")
hf = import_module("06_model.hf")
int8 = import_module("06_model.int8")
generate = import_module("06_model.generate")
template = import_module("08_sft.template")
lora = import_module("08_sft.lora")

SPECIALS = ["<unk>", "<s>", "</s>"] + [f"<r{i}>" for i in range(13)]  # lesson 01's ids 0..15
TEXT = "Once upon a time, a small model learned to count: un, deux, trois. Héllo wörld, 日本語のテキスト, naïve café. "
SAMPLES = [TEXT, "  two spaces,\nnew line\n\n\ttab 12345 67 3.14", "héllo </s> <s>日本 <r3>", " leading space",
           "<r12><unk>x</s>", "emoji 🙂 and Ωμέγα\r\n"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def train_tokenizer(specials, path):
    """A byte-level BPE of lesson 01's shape, trained in-process on a few KB."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, SAMPLES[1]] * 20, trainer)
    tok.save(str(path))
    return path


def tiny_model(vocab_size=300):
    """d_model 64 and hidden 192: every matrix row is a multiple of q8_0's 32-weight block. N(0, 0.3)
    matrices give varied greedy continuations, like a trained model's (see test_06_model)."""
    config = lillm.ModelConfig(vocab_size=vocab_size, d_model=64, n_layers=2, max_seq_len=48, q_heads=4, kv_heads=2,
                               multiple_of=32, rope_theta=500.0)
    model = lillm.LilLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return train_tokenizer(SPECIALS, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def trained_tiny_model(tokenizer_path, steps=150):
    """The tiny model after a few seconds of AdamW on the sample texts: confident next-token guesses, so
    greedy decoding is a fair test of q8_0 (a random model's near-ties flip under any rounding)."""
    torch.manual_seed(0)
    model = lillm.LilLM(tiny_model().config).train()
    ids = torch.tensor(Tokenizer.from_file(str(tokenizer_path)).encode("".join(SAMPLES) * 4).ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 49, (8,)).tolist()
        batch = torch.stack([ids[i:i + 49] for i in starts])  # (8, 49)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_path):
    """{type: path} of the trained tiny model in each type, each alone in its directory (a tokenizer.json
    beside a .gguf would be loaded by transformers instead of the file's own vocabulary)."""
    model = trained_tiny_model(tokenizer_path)
    out = tmp_path_factory.mktemp("gguf")
    paths = {t: G.export_gguf(model, tokenizer_path, out / t / "lillm.gguf", t, template.CHAT_TEMPLATE) for t in G.TYPES}
    return model, paths


def load_transformers(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def test_the_reader_finds_every_key_and_tensor_as_written(exported, tokenizer_path):
    model, paths = exported
    cfg = model.config
    reader = gguf.GGUFReader(paths["f32"])
    value = lambda key: reader.get_field(key).contents()  # noqa: E731
    expected = {
        "general.architecture": "llama", "general.file_type": gguf.LlamaFileType.ALL_F32,
        "llama.vocab_size": 300, "llama.context_length": 48, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": cfg.hidden_dim, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16, "llama.rope.freq_base": 500.0,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
    }
    assert {k: value(k) for k in expected} == expected
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    # lesson 08's template, less transformers' {% generation %} extension: any Jinja engine renders it alike
    chat = [{"role": "user", "content": "Who's there?"}, {"role": "assistant", "content": "Nay, answer me."}]
    stored = jinja2.Environment().from_string(value("tokenizer.chat_template"))
    assert "generation %" not in value("tokenizer.chat_template")
    assert stored.render(messages=chat, add_generation_prompt=False) == "<s><r1>Who's there?</s><r2>Nay, answer me.</s>"
    tok = json.loads(tokenizer_path.read_text())
    assert value("tokenizer.ggml.tokens") == [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    assert value("tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    assert value("tokenizer.ggml.token_type") == [3] * 16 + [1] * 284  # specials are CONTROL, the rest NORMAL
    # every tensor under llama.cpp's name, as it is (no RoPE permutation), the tied head not stored
    state = {G.gguf_name(k): v for k, v in model.state_dict().items() if k != weights.TIED}
    tensors = {t.name: t for t in reader.tensors}
    assert tensors.keys() == state.keys() and "output.weight" not in tensors
    assert "blk.1.attn_q.weight" in tensors and "token_embd.weight" in tensors and "output_norm.weight" in tensors
    for name, t in tensors.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(t.data).reshape(state[name].shape), state[name].numpy()), name


def test_types_store_what_llama_cpp_expects(exported):
    _, paths = exported
    for type_name, matrices in [("f16", "F16"), ("q8_0", "Q8_0")]:
        reader = gguf.GGUFReader(paths[type_name])
        kinds = {t.name: t.tensor_type.name for t in reader.tensors}
        assert all(kind == ("F32" if "norm" in name else matrices) for name, kind in kinds.items()), kinds
    # a row that is not a whole number of 32-weight blocks cannot be q8_0: it stays f16, as llama.cpp's converter does
    assert G.tensor_data(torch.randn(4, 20), gguf.GGMLQuantizationType.Q8_0)[1] == gguf.GGMLQuantizationType.F16
    sizes = {t: p.stat().st_size for t, p in paths.items()}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"], sizes  # 4, 2 and 34/32 bytes a weight, plus the vocabulary


def test_transformers_gives_lilLMs_logits_in_f32_and_f16(exported):
    model, paths = exported
    tokens = torch.randint(0, 300, (3, 48))
    with torch.no_grad():
        ours = model(tokens)[0]
        assert_close(load_transformers(paths["f32"])(tokens).logits, ours, atol=1e-4, rtol=1e-4)
        f16 = load_transformers(paths["f16"])(tokens).logits
    assert (f16 - ours).abs().max() < 0.02 * ours.abs().max(), "f16 weights: within 2% of the largest logit"


def test_q8_0_is_the_dequantized_model_and_decodes_the_same_tokens(exported, tokenizer_path):
    model, paths = exported
    reader = gguf.GGUFReader(paths["q8_0"])
    deq = copy.deepcopy(model)  # lilLM holding exactly the weights the file stores (gguf's own dequantizer)
    names = {G.gguf_name(k): k for k in deq.state_dict() if k != weights.TIED}
    with torch.no_grad():
        for t in reader.tensors:
            w = gguf.quants.dequantize(np.array(t.data), t.tensor_type)  # a copy: the reader's data is read-only
            deq.get_parameter(names[t.name]).copy_(torch.from_numpy(w.reshape(deq.get_parameter(names[t.name]).shape)))
    ref = load_transformers(paths["q8_0"])
    tokens = torch.randint(0, 300, (3, 48))
    with torch.no_grad():
        ours, theirs, q8 = model(tokens)[0], ref(tokens).logits, deq(tokens)[0]
        int8_logits = int8.quantize_int8(copy.deepcopy(model))(tokens)[0]
    assert_close(theirs, q8, atol=1e-4, rtol=1e-4)  # transformers runs the stored blocks, nothing else
    # 255 levels per block of 32 (q8_0) or per row (lesson 06's int8): both about 2% here, as in test_06_model
    error = lambda logits: ((logits - ours).norm() / ours.norm()).item()  # noqa: E731
    assert error(q8) < 0.05 and error(q8) < 1.5 * error(int8_logits), (error(q8), error(int8_logits))
    ids = Tokenizer.from_file(str(tokenizer_path)).encode(TEXT).ids
    for start in (0, 7, 15):
        prompt = torch.tensor([ids[start:start + 6]])
        theirs = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False)
        ours = generate.generate(model, prompt.tolist(), 32)[0]
        assert theirs[0, 6:].tolist() == ours and len(set(ours)) > 5


def test_the_hf_exports_permutation_would_be_wrong_here(exported, tokenizer_path, tmp_path):
    """llama.cpp's llama rotates consecutive pairs, as lesson 03 does: permuting wq/wk as for transformers'
    halves (what hf.py must do) gives another model."""
    model, _ = exported
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        for layer in permuted.layers:
            layer.attention.wq.weight.copy_(hf.interleaved_to_halves(layer.attention.wq.weight, 4))
            layer.attention.wk.weight.copy_(hf.interleaved_to_halves(layer.attention.wk.weight, 2))
    ref = load_transformers(G.export_gguf(permuted, tokenizer_path, tmp_path / "permuted.gguf"))
    tokens = torch.randint(0, 300, (1, 48))
    with torch.no_grad():
        assert (ref(tokens).logits - model(tokens)[0]).abs().max() > 1.0


def test_transformers_tokenizer_from_the_file_gives_lilLMs_ids(exported, tokenizer_path):
    from transformers import AutoTokenizer

    _, paths = exported
    theirs, ours = AutoTokenizer.from_pretrained(paths["q8_0"].parent, gguf_file="lillm.gguf"), Tokenizer.from_file(str(tokenizer_path))
    for text in SAMPLES:
        assert theirs(text)["input_ids"] == ours.encode(text).ids, text
        assert theirs.decode(ours.encode(text).ids) == text
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.unk_token_id) == (1, 2, 0)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who's there?\n"},
            {"role": "assistant", "content": "Bernardo."}, {"role": "user", "content": "Long live the king!"}]
    expected, _ = template.ChatFormat(ours).encode(chat, add_generation_prompt=True)
    assert theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False) == expected


def test_command_exports_a_checkpoint_and_an_unmerged_lora_run(tmp_path, tokenizer_path, capsys):
    torch.manual_seed(0)
    model = tiny_model()
    weights.save_model(model, tmp_path / "base" / "model.safetensors")
    G.main(["export", "--checkpoint", str(tmp_path / "base"), "--tokenizer", str(tokenizer_path),
            "--out", str(tmp_path / "a" / "base.gguf"), "--type", "q8_0"])
    assert "q8_0" in capsys.readouterr().out and gguf.GGUFReader(tmp_path / "a" / "base.gguf").get_field("tokenizer.chat_template") is None
    G.main(["export", "--checkpoint", str(tmp_path / "base"), "--tokenizer", str(tokenizer_path),
            "--out", str(tmp_path / "a" / "forced.gguf"), "--chat"])  # --chat cannot invent a template
    assert "chat template" not in capsys.readouterr().out
    assert gguf.GGUFReader(tmp_path / "a" / "forced.gguf").get_field("tokenizer.chat_template") is None
    # an SFT LoRA run: its run dir holds chat_template.jinja (as lesson 07's describe_run writes it for a chat stage),
    # its checkpoint holds adapters; exported merged, chat template on
    lora.apply_lora(model, rank=2, alpha=4.0)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_(0.0, 0.3)
    run = tmp_path / "sft"
    lora.save_adapters(model, run / "ckpt_best" / lora.ADAPTER_FILE, str(tmp_path / "base"))
    (run / "chat_template.jinja").write_text(template.CHAT_TEMPLATE)
    args = ["export", "--checkpoint", str(run / "ckpt_best"), "--tokenizer", str(tokenizer_path)]
    G.main(args + ["--out", str(tmp_path / "b" / "sft.gguf")])
    assert "chat template" in capsys.readouterr().out
    assert "generation %" not in gguf.GGUFReader(tmp_path / "b" / "sft.gguf").get_field("tokenizer.chat_template").contents()
    ref = load_transformers(tmp_path / "b" / "sft.gguf")
    tokens = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        assert_close(ref(tokens).logits, model(tokens)[0], atol=1e-4, rtol=1e-4)  # the adapters are in
    G.main(args + ["--out", str(tmp_path / "c" / "sft.gguf"), "--no-chat"])
    assert "chat template" not in capsys.readouterr().out
    assert gguf.GGUFReader(tmp_path / "c" / "sft.gguf").get_field("tokenizer.chat_template") is None


def test_bad_inputs_give_one_line_errors_and_write_nothing(tmp_path, tokenizer_path, capsys):
    model = tiny_model()
    weights.save_model(model, tmp_path / "ckpt" / "model.safetensors")
    bad_tokenizer = train_tokenizer(["<s>", "<unk>", "</s>"] + SPECIALS[3:], tmp_path / "swapped.json")
    out = tmp_path / "out" / "x.gguf"
    cases = [(["--type", "q4_k"], "unknown --type 'q4_k'"), (["--tokenizer", str(bad_tokenizer)], "special tokens must be"),
             (["--checkpoint", str(tmp_path / "missing")], "no checkpoint at")]
    for extra, message in cases:
        args = ["export", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", str(tokenizer_path), "--out", str(out), *extra]
        with pytest.raises(SystemExit) as exit:
            G.main(args)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    for bad, message in [(int8.quantize_int8(copy.deepcopy(model)), "int8"), (lora_model(model), "unmerged LoRA")]:
        with pytest.raises(ValueError, match=message):
            G.export_gguf(bad, tokenizer_path, out)
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no file, no temp file left


def lora_model(model):
    wrapped = copy.deepcopy(model)
    lora.apply_lora(wrapped, rank=2, alpha=4.0)
    return wrapped


def test_llama_cpp_runs_the_file_with_lilLMs_tokens_and_logits(exported, tokenizer_path):
    """llama.cpp itself, through llama-cpp-python when it is installed (it compiles llama.cpp, ~10 minutes on
    2 cores: not a test dependency; this test skips without it)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, paths = exported
    ours_tok = Tokenizer.from_file(str(tokenizer_path))
    tokens, prompt = ours_tok.encode(TEXT).ids[:40], ours_tok.encode(TEXT).ids[:6]
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0][0]
    expected = generate.generate(model, [prompt], 32, stop_id=None)[0]
    chat = [{"role": "user", "content": "Who's there?"}, {"role": "assistant", "content": "Nay, answer me."}]
    for type_name, tolerance in [("f32", 1e-5), ("f16", 0.01), ("q8_0", 0.05)]:
        # a float32 KV cache (llama.cpp's default is f16, which alone moves the logits by ~3e-4)
        llm = llama_cpp.Llama(model_path=str(paths[type_name]), n_ctx=48, n_threads=1, logits_all=True,
                              type_k=0, type_v=0, verbose=False)
        for text in SAMPLES:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours_tok.encode(text).ids, text
        rendered = jinja2.Environment().from_string(llm.metadata["tokenizer.chat_template"]).render(
            messages=chat, add_generation_prompt=True)
        assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == template.ChatFormat(ours_tok).encode(chat, True)[0]
        llm.reset()
        llm.eval(tokens)
        theirs = torch.from_numpy(np.array(llm.scores[:len(tokens)]))  # (T, vocab)
        error = ((theirs - ours).norm() / ours.norm()).item()
        assert error < tolerance, f"{type_name}: llama.cpp's logits differ from lilLM's by {error:.2e} (relative norm)"
        llm.reset()
        llm.eval(prompt)
        greedy = []
        for _ in range(32):
            greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(greedy[-1:])
        llm.close()
        assert greedy == expected, type_name
