"""Lesson 06: the assembled model, generation with a KV cache, checkpoints, and the Hugging Face export.

References: transformers' LlamaForCausalLM and AutoTokenizer (the export must load in them and agree),
recomputing the whole sequence at every step (for the KV cache), and closed-form parameter counts.

Run: python -m pytest tests/test_06_model.py -x -q
"""

import copy
import functools
import json
import math
import os
from importlib import import_module

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

lillm = import_module("06_model.model")
hf = import_module("06_model.hf")
generate = import_module("06_model.generate")
weights = import_module("06_model.weights")
int8 = import_module("06_model.int8")
lora = import_module("08_sft.lora")  # lesson 08's adapters, which lesson 06's loader reads merged

SPECIALS = ["<unk>", "<s>", "</s>"] + [f"<r{i}>" for i in range(13)]  # lesson 01's ids 0, 1, 2, 3..15
TEXT = "Once upon a time, a small model learned to count: un, deux, trois. Héllo wörld, 日本語のテキスト, naïve café. "


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def tiny_config(**overrides):
    return lillm.ModelConfig(**{**dict(vocab_size=96, d_model=32, n_layers=2, max_seq_len=48, q_heads=4,
                                         kv_heads=2, multiple_of=16, rope_theta=500.0), **overrides})


def tiny_model(**overrides):
    """A tiny model with N(0, 0.3) matrices: its greedy continuations are varied, like a trained model's,
    where the N(0, 0.02) initialization repeats one token and would let a wrong cache pass unnoticed."""
    model = lillm.LilLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def naive_greedy(model, prompt, max_new_tokens):
    """Recompute the whole sequence for every new token: no cache."""
    seq = list(prompt)
    with torch.no_grad():
        while len(seq) < min(len(prompt) + max_new_tokens, model.config.max_seq_len):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A byte-level BPE trained in-process with lesson 01's special tokens (ids 0..15)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


# ---- the model ----

def count_params(cfg) -> int:
    """notes.md's arithmetic: embedding (tied with the head, counted once) + per layer (wq, wo: d x d; wk, wv:
    d x kv_heads x head_dim; w1, w2, w3: d x hidden; two norm gains) + the final norm's gain."""
    d, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
    return cfg.vocab_size * d + cfg.n_layers * (2 * d * d + 2 * d * kv + 3 * d * cfg.hidden_dim + 2 * d) + d


def test_default_config_has_the_seeds_parameter_count():
    model = lillm.LilLM(lillm.ModelConfig())
    assert model.num_params() == count_params(model.config) == 39_596_544
    assert model.output.weight is model.tok_embeddings.weight  # tied: counted once


@given(d_heads=st.sampled_from([(16, 2), (32, 4), (48, 6), (64, 4)]), kv_div=st.sampled_from([1, 2]),
       n_layers=st.integers(1, 3), vocab=st.integers(16, 200), multiple_of=st.sampled_from([8, 16, 32]))
def test_parameter_count_formula(d_heads, kv_div, n_layers, vocab, multiple_of):
    d, q_heads = d_heads
    cfg = lillm.ModelConfig(vocab_size=vocab, d_model=d, n_layers=n_layers, q_heads=q_heads, kv_heads=q_heads // kv_div,
                            multiple_of=multiple_of, max_seq_len=16)
    assert lillm.LilLM(cfg).num_params() == count_params(cfg)


@pytest.mark.parametrize("bad", [dict(d_model=30, q_heads=4), dict(q_heads=6, kv_heads=4), dict(d_model=24, q_heads=8),
                                 dict(vocab_size=0), dict(dropout=1.0), dict(norm_eps=0.0), dict(n_layers=2.0)])
def test_invalid_config_fails_at_construction(bad):
    with pytest.raises(ValueError):
        tiny_config(**bad)


def test_loss_at_initialization_is_that_of_a_uniform_guess():
    cfg = lillm.ModelConfig()
    tokens = torch.randint(0, cfg.vocab_size, (2, 65))
    with torch.no_grad():
        _, loss = lillm.LilLM(cfg)(tokens[:, :-1], tokens[:, 1:])
    # Logits N(0, sigma^2) with sigma = 0.02 sqrt(d) (tied N(0, 0.02) embedding, unit-RMS features) give
    # E[loss] = ln V + sigma^2 / 2 (notes.md): 9.011 + 0.102.
    expected = math.log(cfg.vocab_size) + (0.02**2 * cfg.d_model) / 2
    assert abs(loss.item() - expected) < 0.05, f"loss {loss.item():.3f}, expected {expected:.3f} (ln V = 9.011)"


def test_loss_is_the_mean_over_targets_that_are_not_ignored():
    model, tokens = tiny_model(), torch.randint(0, 96, (2, 10))
    targets = tokens.clone()
    targets[:, :4] = -100
    logits, loss = model(tokens, targets)
    assert_close(loss, torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 96), tokens[:, 4:].reshape(-1)))


def test_tiny_model_overfits_one_batch():
    model = lillm.LilLM(tiny_config(vocab_size=64, max_seq_len=32)).train()
    tokens = torch.randint(0, 64, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"loss after 200 steps on one batch: {loss.item():.3f} (ln 64 = 4.16 at the start)"


def test_the_whole_model_is_causal():
    model, tokens = tiny_model(), torch.randint(0, 96, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        a, b = model(tokens)[0], model(changed)[0]
    assert_close(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3  # the changed positions do change


def test_bad_inputs_give_clear_errors():
    """Token ids are checked where they enter (here generate; 07's and 08's loaders in their tests), not in
    forward, where reading their range would make a GPU wait for the host at every micro-step."""
    model = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than max_seq_len"):
        generate.generate(model, [[1] * 49], 4)
    with pytest.raises(ValueError, match="non-empty prompts"):
        generate.generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="token ids must be in"):
        generate.generate(model, [[1, 200]], 4)
    with pytest.raises(ValueError, match="token ids must be in"):
        generate.generate(model, [[3], [1, -1]], 4)


# ---- generation ----

@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3), max_new=st.integers(1, 8), seed=st.integers(0, 99))
def test_kv_cache_generation_equals_recomputing_the_sequence(lengths, max_new, seed):
    torch.manual_seed(seed)
    model = tiny_model()
    prompts = [torch.randint(0, 96, (n,)).tolist() for n in lengths]
    assert generate.generate(model, prompts, max_new, stop_id=None) == [naive_greedy(model, p, max_new) for p in prompts]


def test_each_row_of_a_ragged_batch_equals_generating_it_alone():
    model = tiny_model()
    prompts = [torch.randint(0, 96, (n,)).tolist() for n in (3, 11, 1, 7)]
    batch = generate.generate(model, prompts, 20, stop_id=None)
    assert batch == [generate.generate(model, [p], 20, stop_id=None)[0] for p in prompts]
    assert all(len(row) == 20 for row in batch) and len(set(batch[0])) > 5  # varied, not one repeated token


def test_each_row_stops_at_the_stop_token():
    model = tiny_model()
    prompts = [torch.randint(0, 96, (n,)).tolist() for n in (4, 6)]
    free = generate.generate(model, prompts, 24, stop_id=None)
    stop = free[0][5]  # row 0 produces this token at step 5 at the latest
    cut = [row[: row.index(stop) + 1] if stop in row else row for row in free]
    assert generate.generate(model, prompts, 24, stop_id=stop) == cut
    assert len(cut[0]) <= 6 < len(cut[1])  # row 0 stopped, row 1 went on
    steps = list(generate.generate_stream(model, prompts, 24, stop_id=stop))
    assert [step[0] for step in steps[: len(cut[0])]] == cut[0]  # row 0 has the shortest prompt: it starts at step 0
    assert all(step[0] is None for step in steps[len(cut[0]):])  # a finished row stops growing


def test_generation_never_goes_past_max_seq_len():
    model = tiny_model()  # max_seq_len 48
    out = generate.generate(model, [[5] * 45, [7] * 30], 10, stop_id=None)
    assert [len(row) for row in out] == [3, 10]
    assert generate.generate(model, [[5] * 48], 10) == [[]]
    assert generate.generate(model, [[5] * 4], 0) == [[]]


@given(k=st.integers(1, 10), p=st.floats(0.05, 0.95), temperature=st.floats(0.3, 2.0), seed=st.integers(0, 99))
def test_top_k_and_top_p_restrict_the_support(k, p, temperature, seed):
    torch.manual_seed(seed)
    logits = torch.randn(1, 50) * 3
    samples = generate.sample_next(logits.expand(4000, 50), temperature, top_k=k, generator=torch.Generator().manual_seed(seed))
    assert set(samples.tolist()) <= set(logits[0].topk(k).indices.tolist())
    probs = torch.softmax(logits[0] / temperature, -1)
    order = probs.argsort(descending=True)
    n_keep = int((probs[order].cumsum(0) < p).sum()) + 1  # the smallest prefix whose mass reaches p
    samples = generate.sample_next(logits.expand(4000, 50), temperature, top_p=p, generator=torch.Generator().manual_seed(seed))
    assert set(samples.tolist()) <= set(order[:n_keep].tolist())
    if n_keep > 1 and probs[order[n_keep - 1]] > 0.02:
        assert set(samples.tolist()) == set(order[:n_keep].tolist())  # and nothing in it is lost


def test_greedy_is_temperature_zero_and_sampling_follows_the_seed():
    model, prompts = tiny_model(), [[1, 2, 3], [4, 5]]
    assert generate.generate(model, prompts, 10, temperature=0.0) == generate.generate(model, prompts, 10)

    def sample(seed):
        return generate.generate(model, prompts, 20, temperature=1.0, top_k=40, top_p=0.9, generator=torch.Generator().manual_seed(seed))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_generation_restores_training_mode_and_compiled_decoding_agrees(monkeypatch):
    model = tiny_model(dropout=0.1).train()
    prompts = [[1, 2, 3], [9]]
    eager = generate.generate(model, prompts, 6, stop_id=None)
    assert model.training
    # Dynamo's tracing without inductor's code generation (a minute on 2 cores): the graph, not the kernels.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    assert generate.generate(model, prompts, 6, stop_id=None, compile=True) == eager
    # The compiled one-token step must be ONE graph at every position (a graph break per layer would keep
    # the Python overhead that compiling removes): count the frames dynamo hands to a backend.
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter, caches = CompileCounter(), [import_module("05_gqa.gqa").KVCache(1, 10, 2, 8) for _ in model.layers]
    step = torch.compile(model.eval(), backend=counter, dynamic=True)
    with torch.no_grad():
        for pos in range(4, 8):
            step(torch.tensor([[pos]]), start_pos=pos, caches=caches)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for a one-token step"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_generation_on_cuda_matches_cpu():
    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert generate.generate(model.cuda(), prompts, 12, stop_id=None) == generate.generate(model.cpu(), prompts, 12, stop_id=None)


def test_streamed_text_prints_whole_characters(tokenizer_path, monkeypatch):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    ids = tok.encode("日本語 naïve").ids
    # a "model" whose stream is the encoding of a known text, one token per step
    monkeypatch.setattr(generate, "generate_stream", lambda model, prompts, max_new_tokens, **sampling: ([t] for t in ids))
    pieces = list(generate.stream_text(None, tok, "x", 99))
    assert len(ids) > len("日本語 naïve") - 2  # byte-level fragments of characters
    assert "".join(pieces) == "日本語 naïve" and not any("\ufffd" in p for p in pieces)


def test_generate_command_explains_how_to_get_a_checkpoint(tmp_path, capsys):
    for argv in ([], ["--checkpoint", str(tmp_path / "missing.safetensors")]):
        with pytest.raises(SystemExit) as exit:
            generate.main(argv)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith("error: no checkpoint") and err.count("\n") == 1, err
        assert "07_pretrain_ddp/train.py" in err and "06_model/hf.py import" in err


def test_generate_command_streams_a_checkpoint_in_float_and_int8(tmp_path, tokenizer_path, capsys, monkeypatch):
    from tokenizers import Tokenizer

    tok, model = Tokenizer.from_file(str(tokenizer_path)), tiny_model(vocab_size=300)  # the fixture's vocabulary
    weights.save_model(model, tmp_path / "m.safetensors")
    runs = (([], model), (["--int8"], int8.quantize_int8(copy.deepcopy(model))))
    quantized = []  # the models the command quantized
    monkeypatch.setattr(int8, "quantize_int8", lambda m, f=int8.quantize_int8: quantized.append(f(m)) or m)
    argv = ["--checkpoint", str(tmp_path / "m.safetensors"), "--tokenizer", str(tokenizer_path), "--prompt", "Once upon",
            "--temperature", "0", "--max_new_tokens", "12"]
    for flags, net in runs:
        generate.main(argv + flags)
        expected = "".join(generate.stream_text(net, tok, "Once upon", 12, temperature=0.0))
        assert capsys.readouterr().out == f"Once upon{expected}\n" and expected, flags
        assert len(quantized) == len(flags)


# ---- checkpoints ----

def test_checkpoint_round_trip_file_and_trainer_directory(tmp_path):
    model = tiny_model()
    weights.save_model(model, tmp_path / "m.safetensors")
    weights.save_model(model, tmp_path / "ckpt_latest" / "model.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert "output.weight" not in f.keys() and "tok_embeddings.weight" in f.keys()  # the tied matrix once
        assert json.loads(f.metadata()["lillm_config"]) == model.config.to_dict()
    assert not list(tmp_path.glob("*.tmp"))
    umask = os.umask(0o022)  # safetensors creates 0600 files: ours follow the umask like any other file
    try:
        weights.save_model(model, tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644
    for path in (tmp_path / "m.safetensors", tmp_path / "ckpt_latest"):
        loaded = weights.load_model(path)
        assert loaded.config == model.config and loaded.output.weight is loaded.tok_embeddings.weight
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="07_pretrain_ddp/train.py"):
        weights.load_model(tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError):
        weights.load_model(tmp_path)  # a directory without model.safetensors
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00\x01 this is not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        weights.load_model(tmp_path / "corrupt.safetensors")
    model = tiny_model()
    weights.save_model(model, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        weights.load_model(tmp_path / "truncated.safetensors")
    state = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    other = json.dumps(tiny_config(d_model=64).to_dict())
    save_file(state, str(tmp_path / "mismatch.safetensors"), metadata={"lillm_config": other})
    with pytest.raises(ValueError, match="do not match its config") as err:
        weights.load_model(tmp_path / "mismatch.safetensors")
    assert "\n" not in str(err.value)
    save_file(state, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(ValueError, match="lillm_config"):
        weights.load_model(tmp_path / "nometa.safetensors")


def lora_run(tmp_path, base_model, tokenizer_sha256=None):
    """A base checkpoint and, beside it, lesson 08's LoRA adapters trained on it (B random: a real update)."""
    weights.save_model(base_model, tmp_path / "base" / weights.MODEL_FILE, tokenizer_sha256)
    model = copy.deepcopy(base_model)
    lora.apply_lora(model, rank=2, alpha=4.0, targets=("wq", "wv", "w2"))
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.normal_(0.0, 0.3)
    lora.save_adapters(model, tmp_path / "run" / "ckpt_best" / weights.ADAPTER_FILE, str(tmp_path / "base"))
    return model, tmp_path / "run" / "ckpt_best"


def test_adapters_load_merged_onto_their_base_and_nowhere_else(tmp_path):
    base = tiny_model()
    adapted, ckpt = lora_run(tmp_path, base)
    expected = lora.merge_lora(copy.deepcopy(adapted)).state_dict()  # lesson 08's own merge
    for path in (ckpt, ckpt / weights.ADAPTER_FILE):
        merged = weights.load_model(path)
        assert merged.state_dict().keys() == expected.keys() and merged.output.weight is merged.tok_embeddings.weight
        assert all(torch.equal(merged.state_dict()[k], v) for k, v in expected.items()), "not bit for bit"
    assert not torch.equal(merged.layers[0].attention.wq.weight, base.layers[0].attention.wq.weight)
    other = tiny_model()  # another base: under the recorded path, or passed as base=
    weights.save_model(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="trained on another base") as err:
        weights.load_model(ckpt, base=tmp_path / "other.safetensors")
    weights.save_model(other, tmp_path / "base" / weights.MODEL_FILE)
    with pytest.raises(ValueError, match="trained on another base") as err2:
        weights.load_model(ckpt)
    assert "\n" not in str(err.value) + str(err2.value)


def test_load_pair_refuses_a_tokenizer_that_is_not_the_checkpoints(tmp_path, tokenizer_path):
    from tokenizers import Tokenizer

    sha = import_module("01_tokenizer.tokenizer").tokenizer_sha256(tokenizer_path)
    model = tiny_model(vocab_size=300)
    weights.save_model(model, tmp_path / "right.safetensors", tokenizer_sha256=sha)
    loaded, tok, path = weights.load_pair(tmp_path / "right.safetensors", tokenizer_path)
    assert path == tokenizer_path and tok.get_vocab_size() == Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    weights.save_model(tiny_model(), tmp_path / "small.safetensors")  # vocab_size 96 < the tokenizer's 300
    with pytest.raises(ValueError, match="more than the model's vocab_size 96"):
        weights.load_pair(tmp_path / "small.safetensors", tokenizer_path)
    weights.save_model(model, tmp_path / "other.safetensors", tokenizer_sha256="0" * 64)
    with pytest.raises(ValueError, match="is not the tokenizer .* was trained with") as err:
        weights.load_pair(tmp_path / "other.safetensors", tokenizer_path)
    assert "\n" not in str(err.value)
    _, ckpt = lora_run(tmp_path / "lora", model, tokenizer_sha256="0" * 64)  # adapters: their base's tokenizer
    with pytest.raises(ValueError, match="is not the tokenizer"):
        weights.load_pair(ckpt, tokenizer_path)


def test_chat_template_is_found_where_lesson_08_writes_it(tmp_path, tokenizer_path):
    template = import_module("08_sft.template").CHAT_TEMPLATE
    model = tiny_model(vocab_size=300)
    assert weights.chat_template(hf.export_hf(model, tokenizer_path, tmp_path / "hf_chat", chat_template=template)) == template
    assert weights.chat_template(hf.export_hf(model, tokenizer_path, tmp_path / "hf_base")) is None
    weights.save_model(model, tmp_path / "run" / "ckpt_best" / weights.MODEL_FILE)
    for path in (tmp_path / "run" / "ckpt_best", tmp_path / "run" / "ckpt_best" / weights.MODEL_FILE):
        assert weights.chat_template(path) is None  # a base model's run
    (tmp_path / "run" / "chat_template.jinja").write_text(template)  # what lesson 07's describe_run writes
    for path in (tmp_path / "run" / "ckpt_best", tmp_path / "run" / "ckpt_best" / weights.MODEL_FILE):
        assert weights.chat_template(path) == template


# ---- int8 weight-only decoding ----

@given(in_features=st.integers(1, 40), out_features=st.integers(1, 24), rows=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_int8_linear_is_the_dequantized_matmul(in_features, out_features, rows, seed):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    q = int8.Int8Linear(linear)
    w, wq, s = linear.weight.detach(), q.weight, q.scale.float()  # (out, in), (out, in) int8, (out,)
    assert wq.dtype == torch.int8 and wq.abs().amax(dim=1).min() >= 126  # the full range (the bf16 scale rounds)
    assert torch.all((w - wq.float() * s[:, None]).abs() <= s[:, None] * (0.5 + 1e-6)), "not rounded to nearest"
    x = torch.randn(rows, 5, in_features)
    expected = F.linear(x, wq.float()) * s  # (rows, 5, out) the formula, in float32
    if in_features % int8.KERNEL_MULTIPLE:  # the formula itself
        assert_close(q(x), expected)
    else:  # aten's int8 kernel: bf16 activations and scales, an fp32 sum, a bf16 result
        assert_close(q(x), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("d_model", [32, 20])  # in_features a multiple of 16 (aten's kernel) or not (the formula)
def test_int8_model_decodes_like_the_float_model(d_model, tmp_path):
    model = tiny_model(d_model=d_model, q_heads=2, kv_heads=1)
    tokens = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        expected, _ = model(tokens)
        int8.quantize_int8(model)
        assert all(isinstance(m, int8.Int8Linear) for m in (model.output, model.layers[0].attention.wq, model.layers[1].feed_forward.w2))
        assert model.tok_embeddings.weight.dtype == torch.float32
        logits, _ = model(tokens)
    # Rounding to 255 levels moves each product by ~1% (uniform error s/sqrt(12) against weights of ~max/3),
    # bf16 activations add ~0.3%; over two blocks that compounds to a few percent, not tens.
    assert ((logits - expected).norm() / expected.norm()).item() < 0.05
    # the cache of the int8 model agrees with recomputing the int8 model over the whole sequence
    assert generate.generate(model, [[5, 6, 7]], 10, stop_id=None)[0] == naive_greedy(model, [5, 6, 7], 10)
    with pytest.raises(ValueError, match="quantize after load_model"):
        weights.save_model(model, tmp_path / "never-written.safetensors")
    assert not list(tmp_path.iterdir())


def test_compiled_int8_decoding_equals_eager():
    """Inductor lowers aten's int8 kernel (one layer: a real compile, not the eager backend)."""
    model = int8.quantize_int8(tiny_model(n_layers=1))
    prompts = [[1, 2, 3], [9]]
    torch._dynamo.reset()
    assert generate.generate(model, prompts, 6, stop_id=None, compile=True) == generate.generate(model, prompts, 6, stop_id=None)


# ---- Hugging Face interop ----

@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_path):
    torch.manual_seed(0)
    model = tiny_model(vocab_size=300)  # the fixture tokenizer's vocabulary
    out = hf.export_hf(model, tokenizer_path, tmp_path_factory.mktemp("hf") / "export")
    return model, out


def test_rope_permutation_is_a_permutation_and_its_inverse():
    w = torch.randn(4 * 8, 5)
    halves = hf.interleaved_to_halves(w, n_heads=4)
    assert torch.equal(hf.halves_to_interleaved(halves, n_heads=4), w)
    assert torch.equal(halves[:8], w[:8][[0, 2, 4, 6, 1, 3, 5, 7]])  # head 0: even rows, then odd rows


def test_export_config_and_logits_match_transformers(exported):
    from transformers import AutoModelForCausalLM

    model, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == 2 and config["rope_theta"] == 500.0
    assert hf.hf_config(lillm.ModelConfig(), torch.float32)["intermediate_size"] == 1408
    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 300, (3, 48))
    with torch.no_grad():
        assert_close(model(tokens)[0], ref(tokens).logits, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers_generate(exported):
    from transformers import AutoModelForCausalLM

    model, out = exported
    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = torch.randint(3, 300, (1, 6))
    theirs = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False)
    ours = generate.generate(model, prompt.tolist(), 32)[0]
    assert ours == theirs[0, 6:].tolist() and len(set(ours)) > 5


def test_import_of_the_export_is_the_same_model(exported, tmp_path):
    model, out = exported
    back = hf.import_hf(out)
    # multiple_of is not in a Llama config: the import picks one that gives the same FFN size.
    assert back.config.hidden_dim == model.config.hidden_dim
    assert {**back.config.to_dict(), "multiple_of": 0} == {**model.config.to_dict(), "multiple_of": 0}
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(weights.load_model(out).state_dict()[k], v) for k, v in model.state_dict().items())
    config = json.loads((out / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act"):
        hf.import_hf(tmp_path)
    with pytest.raises(ValueError, match="quantize after load_model"):  # int8 runs, it is not exported
        hf.export_hf(int8.quantize_int8(copy.deepcopy(model)), out / "tokenizer.json", tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


def test_autotokenizer_from_the_export_gives_the_same_ids(exported, tokenizer_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    _, out = exported
    theirs, ours = AutoTokenizer.from_pretrained(out), Tokenizer.from_file(str(tokenizer_path))
    for text in (TEXT, "héllo </s> <s>日本 <r3>", " leading space"):
        assert theirs(text)["input_ids"] == ours.encode(text).ids
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.unk_token_id) == (1, 2, 0)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
