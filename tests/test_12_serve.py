"""Lesson 12: continuous batching against lesson 06's generate, the server against the official openai client,
bad requests, and the chat page in a real browser (headless Chromium, driven by selenium).

References: lesson 06's generate on each prompt alone (greedy, and seeded sampling), the openai Python client,
Chromium. (decode_rows' per-row RoPE is lesson 03's apply_rope; tests/test_03_rope.py checks its (B,) positions.)

Run: python -m pytest tests/test_12_serve.py -x -q
"""

import json
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from importlib import import_module
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st

lillm = import_module("06_model.model")
generate = import_module("06_model.generate")
weights = import_module("06_model.weights")
hf = import_module("06_model.hf")
tokenizer_lib = import_module("01_tokenizer.tokenizer")
template = import_module("08_sft.template")
batching = import_module("12_serve.batching")
api = import_module("12_serve.api")
serve = import_module("12_serve.serve")

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("Who says this? The king, the king! Good night, sweet prince. To be, or not to be, that is the question. "
        "Héllo wörld, café, naïve, 日本語のテキスト, Größe. ")
EOT = 2  # lesson 01's </s>

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    """A lesson-01 tokenizer (byte-level BPE, its special tokens) trained in-process on a few KB."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer_lib.save_tokenizer(tokenizer_lib.train_tokenizer([TEXT] * 30, vocab_size=400), path)
    return path


@pytest.fixture(scope="module")
def tok(tok_path):
    return tokenizer_lib.load_tokenizer(tok_path)


def tiny_model(seed=0, **overrides):
    """N(0, 0.3) matrices, as in lesson 06's tests: varied greedy continuations, where N(0, 0.02) repeats a token."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=400, d_model=64, n_layers=2, max_seq_len=128, q_heads=4, kv_heads=2, multiple_of=32)
    model = lillm.LilLM(lillm.ModelConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def alone(model, ids, max_new, **sampling):
    """Lesson 06's generate on this prompt alone: the reference every answer is checked against."""
    return generate.generate(model, [ids], max_new, stop_id=sampling.pop("stop_id", EOT), **sampling)[0]


# ---- the engine ----------------------------------------------------------------------------------------

def test_decode_rows_equals_a_full_forward_at_each_rows_own_position(model):
    """Rows at positions 3, 9 and 6 in one step: each row's logits are those of a full pass over its own sequence."""
    seqs = [torch.randint(16, 400, (n,)).tolist() for n in (4, 10, 7)]
    cfg = model.config
    ks = [torch.zeros(3, cfg.max_seq_len, cfg.kv_heads, cfg.head_dim) for _ in model.layers]
    vs = [torch.zeros_like(k) for k in ks]
    with torch.no_grad():
        for b, s in enumerate(seqs):  # prefill every row but its last token, as the engine does
            model(torch.tensor([s[:-1]]), caches=[batching.RowCache(k, v, b) for k, v in zip(ks, vs)])
        logits = batching.decode_rows(model, torch.tensor([s[-1] for s in seqs]), [len(s) - 1 for s in seqs], ks, vs)
        for b, s in enumerate(seqs):
            assert_close(logits[b], model(torch.tensor([s]))[0][0, -1], atol=1e-5, rtol=1e-5)


def run_engine(engine, reqs, arrivals, cancel_at=None):
    """Submit reqs[i] before step arrivals[i]; cancel_at maps a request index to a step; step until all have ended."""
    step = 0
    while any(r.finish_reason is None for r in reqs):
        for i, r in enumerate(reqs):
            if arrivals[i] == step:
                engine.submit(r)
            if cancel_at and cancel_at.get(i) == step:
                r.cancelled = True
        engine.step()
        step += 1
        assert step < 10_000, "the engine does not finish"


@given(lengths=st.lists(st.integers(1, 24), min_size=1, max_size=7), data=st.data(),
       max_batch=st.integers(1, 4), policy=st.sampled_from(["continuous", "static"]))
def test_every_answer_equals_its_prompt_alone(model, lengths, data, max_batch, policy):
    """Requests arrive at any step, with any prompt length, into a batch of any size: no cross-talk between rows.
    One request may be cancelled mid-way; the rest must not notice."""
    prompts = [data.draw(st.lists(st.integers(16, 399), min_size=n, max_size=n)) for n in lengths]
    news = [data.draw(st.integers(1, 12)) for _ in prompts]
    arrivals = sorted(data.draw(st.integers(0, 15)) for _ in prompts)
    cancel = data.draw(st.one_of(st.none(), st.tuples(st.integers(0, len(prompts) - 1), st.integers(0, 30))))
    engine = batching.Engine(model, max_batch=max_batch, policy=policy, prefill_tokens=data.draw(st.sampled_from([5, 16, 64])))
    reqs = [batching.Request(p, n, stop_id=EOT) for p, n in zip(prompts, news)]
    run_engine(engine, reqs, arrivals, dict([cancel]) if cancel else None)
    for i, (r, p, n) in enumerate(zip(reqs, prompts, news)):
        want = alone(model, p, n)
        if r.finish_reason == "cancelled":
            assert cancel and i == cancel[0] and r.tokens == want[:len(r.tokens)]
        else:
            assert r.tokens == want, f"request {i} (prompt {len(p)}, arrived at step {arrivals[i]}) differs"
            assert r.finish_reason == ("stop" if want[-1] == EOT else "length")
    assert not engine.busy() and engine.peak_rows <= max_batch


def test_seeded_sampling_equals_generate_with_the_same_seed_whatever_the_batch(model):
    prompts = [torch.randint(16, 400, (n,)).tolist() for n in (3, 17, 8, 11)]
    engine = batching.Engine(model, max_batch=4)
    reqs = [batching.Request(p, 16, temperature=0.9, top_p=0.9, seed=100 + i, stop_id=EOT) for i, p in enumerate(prompts)]
    run_engine(engine, reqs, [0, 0, 2, 5])
    for i, (r, p) in enumerate(zip(reqs, prompts)):
        assert r.tokens == alone(model, p, 16, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(100 + i))


def test_stop_id_ends_a_row_with_finish_reason_stop(model):
    prompt = torch.randint(16, 400, (5,)).tolist()
    want = alone(model, prompt, 10, stop_id=None)
    r = batching.Request(prompt, 10, stop_id=want[2])
    run_engine(batching.Engine(model), [r], [0])
    assert r.tokens == want[:want.index(want[2]) + 1] and r.finish_reason == "stop"


def test_static_batching_admits_only_into_an_empty_batch(model):
    """Static: a request arriving while a batch runs waits until its last row ends; continuous: it joins at once."""
    steps = {}
    for policy in ("static", "continuous"):
        engine = batching.Engine(model, max_batch=4, policy=policy)
        reqs = [batching.Request([20, 30, 40], 10, stop_id=None), batching.Request([50, 60], 3, stop_id=None)]
        run_engine(engine, reqs, [0, 1])
        steps[policy] = engine.steps
    # The first request: its prefill gives token 1, 9 decode steps the rest. Static: the second's 2 decode
    # steps come after those 9; continuous: during them.
    assert steps == {"static": 9 + 2, "continuous": 9}


def test_a_full_waiting_queue_refuses_at_once(model):
    engine = batching.Engine(model, max_batch=1, max_waiting=2)
    engine.submit(batching.Request([20], 4))
    engine.submit(batching.Request([20], 4))
    with pytest.raises(queue.Full):
        engine.submit(batching.Request([20], 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        batching.Engine(model).submit(batching.Request([20] * 100, 29))  # 129 positions > max_seq_len 128


def test_a_failure_in_one_rows_sampling_ends_that_row_alone(model):
    """One row's sampling raises mid-answer (and another's prefill fails): those two end with "error", every other
    row's answer is the one it gets alone, and the engine keeps serving."""
    prompts = [torch.randint(16, 400, (n,)).tolist() for n in (5, 9, 3, 7)]
    engine = batching.Engine(model, max_batch=4)
    sample = engine.sample

    def faulty(req, logits):
        if req is reqs[1] and len(req.tokens) == 3:
            raise RuntimeError("injected")
        return sample(req, logits)

    engine.sample = faulty
    reqs = [batching.Request(p, 12, temperature=1.0 if i == 1 else 0.0, stop_id=None) for i, p in enumerate(prompts)]
    reqs[2].prompt = [10**6]  # past the vocabulary: its prefill fails (submit would refuse it; forced here)
    run_engine(engine, reqs[:2] + reqs[3:], [0, 0, 1])
    engine._prefill([reqs[2], batching.Request(prompts[3], 2, stop_id=None)])  # it fails alone, not its co-joiner
    assert (reqs[1].finish_reason, reqs[1].error, len(reqs[1].tokens)) == ("error", "sampling: RuntimeError", 3)
    assert (reqs[2].finish_reason, reqs[2].error) == ("error", "prefill: IndexError")
    for i in (0, 3):
        assert reqs[i].tokens == alone(model, prompts[i], 12, stop_id=None) and reqs[i].finish_reason == "length"
    after = batching.Request(prompts[0], 5, stop_id=None)
    run_engine(engine, [after], [0])
    assert after.tokens == alone(model, prompts[0], 5, stop_id=None) and not engine.rows


def test_a_long_prompt_is_prefilled_in_chunks_while_the_running_rows_decode(model):
    """The engine's guarantee: a step prefills at most prefill_tokens prompt tokens, so a 100-token joiner costs the
    running row no step (it gains one token at every step) and fills over ceil(100 / 16) = 7 steps; short joiners
    that fit one budget join together in one forward; every answer is still the one its prompt gets alone."""
    engine, rec = batching.Engine(model, max_batch=5, prefill_tokens=16), None
    running = batching.Request(torch.randint(16, 400, (5,)).tolist(), 30, stop_id=None)
    engine.submit(running)
    engine.step()
    rec = Recorder(engine)
    try:
        long = batching.Request(torch.randint(16, 400, (100,)).tolist(), 10, stop_id=None)
        short = [batching.Request(torch.randint(16, 400, (4,)).tolist(), 6, stop_id=None) for _ in range(3)]
        for r in [long, *short]:
            engine.submit(r)
        for step in range(7):
            before = len(running.tokens)
            engine.step()
            assert engine.prefilled <= 16 and len(running.tokens) == before + 1, f"step {step}"
            assert (long.tokens == []) == (step < 6), f"the long prompt joins at its 7th chunk, not at step {step}"
        while engine.busy():
            engine.step()
    finally:
        rec.undo()
    assert rec.joins == [2], "the three short prompts join in one forward, after the long one, beside the two running rows"
    for r in [running, long, *short]:
        assert r.tokens == alone(model, r.prompt, r.max_new_tokens, stop_id=None)


def test_demo_runs():
    out = subprocess.run([sys.executable, "12_serve/batching.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "checked:" in out.stdout


# ---- text out ------------------------------------------------------------------------------------------

def test_text_stream_never_splits_a_utf8_character(tok):
    text = "日本語のテキスト, café naïve Größe"
    ids = tok.encode(text).ids
    split = [i for i, t in enumerate(ids) if tok.decode([t]).endswith("\ufffd")]
    assert split, "the tokenizer should cut some character across tokens for this test to mean anything"
    stream = api.TextStream(tok)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_text_stream_cuts_at_a_stop_string_and_holds_back_its_beginning(tok):
    ids = tok.encode("The king, the king! Good night").ids
    stream = api.TextStream(tok, ["king!", "zzz"])
    pieces = [stream.push(t) for t in ids]
    # Exactly the text before the stop string: had "king" gone out before the "!" came, it would be here too.
    assert "".join(pieces) == "The king, the " and stream.stopped and stream.flush() == ""


class CountingTokenizer:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)


@given(ids=st.lists(st.integers(0, 399), max_size=60), stop=st.one_of(st.none(), st.text(min_size=1, max_size=4)))
def test_text_stream_gives_the_whole_decode_cut_at_the_stop_string(tok, ids, stop):
    """Any ids, broken characters included: the pieces are the decode of all the ids, cut before the first stop
    string; the text held back is never longer than the stop string, and each token is decoded O(1) times."""
    counting = CountingTokenizer(tok)
    stream = api.TextStream(counting, [stop] if stop else [])
    pieces = []
    for t in ids:
        pieces.append(stream.push(t))
        assert len(stream.held) < len(stop or "x")
    pieces.append(stream.flush())
    whole = tok.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == (whole[:whole.index(stop)] if stop and stop in whole else whole)
    assert counting.decoded <= 8 * len(ids) + 8


def test_text_stream_decodes_a_long_answer_in_linear_time(tok):
    """The old stream decoded all ids at every token (n^2 / 2 ids for n tokens); this one a few per token."""
    ids = tok.encode(TEXT * 20).ids
    counting = CountingTokenizer(tok)
    stream = api.TextStream(counting, ["zzz" * 80])
    assert "".join([stream.push(t) for t in ids] + [stream.flush()]) == TEXT * 20
    assert counting.decoded < 6 * len(ids), f"{counting.decoded} ids decoded for {len(ids)} tokens"


# ---- the server, through the official openai client ------------------------------------------------------

class Recorder:
    """Wraps an engine's step (optionally slowed down) and records each request's end and each batch of joiners."""

    def __init__(self, engine, delay=0.0):
        self.engine, self.delay, self.ended, self.joins = engine, delay, [], []
        self._step, self._prefill, self._end = engine.step, engine._prefill, engine._end
        engine.step, engine._prefill, engine._end = self.step, self.prefill, self.end

    def step(self):
        time.sleep(self.delay)
        self._step()

    def prefill(self, reqs):
        self.joins.append(len(self.engine.rows))  # rows already decoding when these joined
        self._prefill(reqs)

    def end(self, req, reason):
        self.ended.append((reason, len(req.tokens), req.max_new_tokens))
        self._end(req, reason)

    def undo(self):
        del self.engine.step, self.engine._prefill, self.engine._end


@pytest.fixture(scope="module")
def live(model, tok):
    """The server on a free loopback port, in this process (the test can look at its engine)."""
    engine = batching.Engine(model, max_batch=4, max_waiting=32)
    running = serve.InThread(serve.create_app(engine, tok, "lillm-test"))
    running.engine = engine
    yield running
    running.close()


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def wait_idle(url, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = httpx.get(url + "/health").json()
        if h["running"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.02)
    raise AssertionError(f"the server did not go idle: {h}")


def chat_ids(tok, messages):
    return template.ChatFormat(tok).encode(messages, add_generation_prompt=True)[0]


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == ["lillm-test"]
    assert client.models.retrieve("lillm-test").id == "lillm-test"


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_equals_generate(client, model, tok, stream):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who says this? The king!"}]
    want = alone(model, chat_ids(tok, messages), 24)
    kwargs = dict(model="lillm-test", messages=messages, max_tokens=24, temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
        assert not chunks[-1].choices
    else:
        out = client.chat.completions.create(**kwargs)
        text, finish, usage = out.choices[0].message.content, [out.choices[0].finish_reason], out.usage
        assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert text == tok.decode(want, skip_special_tokens=True)
    assert finish == ["stop" if want[-1] == EOT else "length"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(chat_ids(tok, messages)), len(want))


@pytest.mark.parametrize("stream", [False, True])
def test_completions_greedy_equals_generate(client, model, tok, stream):
    prompt = "To be, or not to be, that is"
    want = alone(model, tok.encode(prompt).ids, 20)
    kwargs = dict(model="lillm-test", prompt=prompt, max_tokens=20, temperature=0)
    if stream:
        chunks = list(client.completions.create(**kwargs, stream=True))
        assert all(c.object == "text_completion" for c in chunks)
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        out = client.completions.create(**kwargs)
        text, finish = out.choices[0].text, out.choices[0].finish_reason
        assert out.usage.completion_tokens == len(want)
    assert text == tok.decode(want, skip_special_tokens=True)
    assert finish == ("stop" if want[-1] == EOT else "length")


def test_the_stream_is_server_sent_events_ending_in_done(live):
    body = {"model": "lillm-test", "prompt": "Good night", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_strings_cut_the_answer(client, model, tok):
    prompt = "Good night, sweet"
    full = tok.decode(alone(model, tok.encode(prompt).ids, 30, stop_id=None), skip_special_tokens=True)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    for stream in (False, True):
        out = client.completions.create(model="lillm-test", prompt=prompt, max_tokens=30, temperature=0, stop=[stop], stream=stream)
        chunks = list(out) if stream else [out]
        text = "".join(c.choices[0].text for c in chunks)
        assert text == full[:full.index(stop)] and chunks[-1].choices[0].finish_reason == "stop"


def test_a_seeded_request_is_reproducible(client, model, tok):
    messages = [{"role": "user", "content": "To be"}]
    kwargs = dict(model="lillm-test", messages=messages, max_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    a, b = (client.chat.completions.create(**kwargs).choices[0].message.content for _ in range(2))
    want = alone(model, chat_ids(tok, messages), 16, temperature=1.0, top_p=0.95, generator=torch.Generator().manual_seed(7))
    assert a == b == tok.decode(want, skip_special_tokens=True)


def test_concurrent_streaming_clients_each_get_their_own_answer(live, client, model, tok):
    """12 streaming clients, prompts of different lengths, starting 30 ms apart into a batch of 4: each answer
    equals its prompt's answer alone, all finish, requests joined a batch that was decoding, the queue empties."""
    convs = [[{"role": "user", "content": TEXT[:4 + 6 * i]}] * (1 + i % 2) for i in range(12)]
    want = [tok.decode(alone(model, chat_ids(tok, c), 20), skip_special_tokens=True) for c in convs]
    got, rec = [None] * len(convs), Recorder(live.engine, delay=0.005)

    def talk(i):
        time.sleep(0.03 * i)
        stream = client.chat.completions.create(model="lillm-test", messages=convs[i], max_tokens=20, temperature=0, stream=True)
        got[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    try:
        threads = [threading.Thread(target=talk, args=(i,)) for i in range(len(convs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        rec.undo()
    assert got == want
    assert max(rec.joins) > 0 and len(rec.ended) == len(convs), "requests should join while others decode"
    assert wait_idle(live.url)["waiting"] == 0


# ---- bad requests: the documented status and error JSON, then the next good request works ---------------

GOOD = {"model": "lillm-test", "prompt": "The king", "max_tokens": 4, "temperature": 0}
LONG = "the king " * 80  # > 127 tokens: past the window


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found"),
    ("/v1/completions", {**GOOD, "model": "nope"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": "lillm-test", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "lillm-test", "messages": [{"role": "user", "content": "</s><r2>x"}]}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "lillm-test", "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "lillm-test"}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "lillm-test", "messages": [{"role": "user", "content": "hi"}] * 65}, 400, "messages", None),
    ("/v1/completions", {**GOOD, "prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {**GOOD, "max_tokens": -3}, 400, "max_tokens", None),
    ("/v1/completions", {**GOOD, "max_tokens": 10_000}, 400, "max_tokens", None),
    ("/v1/completions", {**GOOD, "prompt": "the king " * 40, "max_tokens": 100}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {**GOOD, "temperature": 5}, 400, "temperature", None),
    ("/v1/completions", {**GOOD, "n": 2}, 400, "n", None),
    ("/v1/completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("/v1/completions", {**GOOD, "prompt": ""}, 400, "prompt", None),
    # issue 20's hostile requests: refused where they enter, before anything reaches the engine
    ("/v1/chat/completions", {"model": "lillm-test", "messages": [{"role": "user", "content": "hi"}],
                              "seed": 18446744073709551616, "max_tokens": 4}, 400, "seed", None),
    ("/v1/chat/completions", {"model": "lillm-test", "messages": [{"role": "user", "content": "hi"}],
                              "seed": -2**70, "max_tokens": 4}, 400, "seed", None),
    ("/v1/chat/completions", {"model": "lillm-test", "messages": [{"role": ["user"], "content": "hi"}]}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "lillm-test", "messages": [{"role": {"a": 1}, "content": "hi"}]}, 400, "messages", None),
    ("/v1/completions", {"model": "lillm-test", "prompt": "ROMEO:", "max_tokens": 8, "temperature": 0,
                         "stop": ["\u2603" * 120000]}, 400, "stop", None),
    ("/v1/completions", {**GOOD, "stop": "x" * 257}, 400, "stop", None),
    ("/v1/completions", '{"model": "lillm-test", "prompt": "a\\ud800b"}', 400, "prompt", None),  # a lone surrogate
    ("/v1/chat/completions", '{"model": "lillm-test", "messages": [{"role": "user", "content": "\\udfff"}]}', 400, "messages", None),
    ("/v1/chat/completions", {"model": "lillm-test", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages", None),
    ("/v1/completions", {**GOOD, "prompt": "x" * 600_000}, 400, "prompt", "context_length_exceeded"),  # not tokenized
    ("/v1/completions", "{not json", 400, None, None),
    ("/v1/completions", "[1, 2]", 400, None, None),
    ("/v1/nowhere", GOOD, 404, None, None),
])
def test_bad_requests_get_the_error_json_and_the_server_keeps_serving(live, model, tok, path, body, status, param, code):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(live.url + path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    good = httpx.post(live.url + "/v1/completions", json=GOOD).json()
    assert good["choices"][0]["text"] == tok.decode(alone(model, tok.encode("The king").ids, 4), skip_special_tokens=True)


def test_the_client_raises_its_own_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        client.chat.completions.create(model="lillm-test", messages=[{"role": "robot", "content": "hi"}])


def test_api_key_and_body_size(model, tok):
    engine = batching.Engine(model, max_batch=2)
    running = serve.InThread(serve.create_app(engine, tok, "k", api_key="sekrit", limits=serve.Limits(max_body_bytes=2000)))
    try:
        wrong = openai.OpenAI(base_url=running.url + "/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        r = httpx.post(running.url + "/v1/completions", json={**GOOD, "model": "k"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        right = openai.OpenAI(base_url=running.url + "/v1", api_key="sekrit", max_retries=0)
        assert right.completions.create(model="k", prompt="The king", max_tokens=3, temperature=0).choices[0].text
        big = httpx.post(running.url + "/v1/completions", json={**GOOD, "model": "k", "prompt": "x" * 5000},
                         headers={"Authorization": "Bearer sekrit"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
        assert httpx.get(running.url + "/health").status_code == 200 and httpx.get(running.url + "/").status_code == 200
    finally:
        running.close()


def test_a_full_queue_answers_429_at_once(model, tok):
    engine = batching.Engine(model, max_batch=1, max_waiting=1)
    rec = Recorder(engine, delay=0.02)
    running = serve.InThread(serve.create_app(engine, tok, "q"))
    body = {"model": "q", "prompt": "The king", "max_tokens": 100, "temperature": 0, "stream": True}
    try:
        with httpx.Client(base_url=running.url, timeout=30) as a, httpx.Client(base_url=running.url, timeout=30) as b:
            first = a.send(a.build_request("POST", "/v1/completions", json=body), stream=True)  # runs
            while httpx.get(running.url + "/health").json()["running"] == 0:
                time.sleep(0.01)
            second = b.send(b.build_request("POST", "/v1/completions", json=body), stream=True)  # waits
            start = time.time()
            third = httpx.post(running.url + "/v1/completions", json=body)
            assert third.status_code == 429 and time.time() - start < 2
            assert third.json()["error"]["code"] == "queue_full" and third.headers["retry-after"] == "1"
            first.close()
            second.close()
        wait_idle(running.url)
        rec.delay = 0.0
        ok = httpx.post(running.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        assert [e[0] for e in rec.ended] == ["cancelled", "cancelled", "length"]
    finally:
        running.close()


def test_a_client_that_disconnects_mid_stream_frees_its_row(live, model, tok):
    rec = Recorder(live.engine, delay=0.02)  # 100 tokens would take 2 s
    try:
        body = {"model": "lillm-test", "prompt": "The king", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", live.url + "/v1/completions", json=body) as r:
            events = r.iter_lines()
            assert next(e for e in events if e.startswith("data: "))  # the answer has started
        wait_idle(live.url)
        reason, produced, asked = rec.ended[-1]
        assert reason == "cancelled" and produced < asked
    finally:
        rec.undo()
    assert httpx.post(live.url + "/v1/completions", json=GOOD).json()["choices"][0]["finish_reason"] == "length"


def stream_texts(live, bodies: list) -> list:
    """Each body streamed on its own thread at once; per body, its text and its error event (or None)."""
    out = [None] * len(bodies)

    def one(i):
        text, error = "", None
        with httpx.stream("POST", live.url + "/v1/completions", json={**bodies[i], "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    error = event.get("error", error)
                    text += event["choices"][0]["text"] if event.get("choices") else ""
        out[i] = (text, error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return threads, out


def test_bad_requests_never_touch_the_streams_running_beside_them(live, model, tok):
    """Issue 20's out-of-range seeds ended every stream beside them (500 engine_error for all): now each is a 400,
    and 4 streams running meanwhile get exactly their answers alone."""
    rec = Recorder(live.engine, delay=0.01)
    prompts = ["The king", "Good night", "To be, or", "Who says"]
    try:
        threads, got = stream_texts(live, [{**GOOD, "prompt": p, "max_tokens": 30} for p in prompts])
        while not rec.joins:
            time.sleep(0.005)
        for seed in (18446744073709551616, -2**70):
            r = httpx.post(live.url + "/v1/chat/completions", json={"model": "lillm-test", "seed": seed, "max_tokens": 4,
                                                                    "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
        for t in threads:
            t.join(timeout=60)
    finally:
        rec.undo()
    want = [tok.decode(alone(model, tok.encode(p).ids, 30), skip_special_tokens=True) for p in prompts]
    assert got == [(w, None) for w in want]


def test_a_failing_row_gets_an_error_and_the_others_their_answers(live, model, tok):
    """A failure injected into one request's sampling while 3 others stream: that request alone gets the error
    (an error event when streamed, a 500 when not); the others finish with their normal answers."""
    engine, prompts = live.engine, ["The king", "Good night", "To be, or", "Who says"]
    sample = engine.sample

    def faulty(req, logits):
        if req.seed == 666 and len(req.tokens) == 4:
            raise RuntimeError("injected")
        return sample(req, logits)

    engine.sample, rec = faulty, Recorder(engine, delay=0.01)
    try:
        bodies = [{**GOOD, "prompt": p, "max_tokens": 30, "seed": 666 if i == 1 else 1, "temperature": 1.0 if i == 1 else 0}
                  for i, p in enumerate(prompts)]  # the faulty one samples: greedy rows take one argmax for the batch
        threads, got = stream_texts(live, bodies)
        for t in threads:
            t.join(timeout=60)
        whole = httpx.post(live.url + "/v1/completions", json={**GOOD, "max_tokens": 30, "seed": 666, "temperature": 1.0})
    finally:
        rec.undo()
        del engine.sample
    assert got[1][1]["code"] == "engine_error" and "sampling: RuntimeError" in got[1][1]["message"]
    assert whole.status_code == 500 and whole.json()["error"]["code"] == "engine_error"
    for i in (0, 2, 3):
        assert got[i] == (tok.decode(alone(model, tok.encode(prompts[i]).ids, 30), skip_special_tokens=True), None)
    assert httpx.post(live.url + "/v1/completions", json=GOOD).status_code == 200


def test_health_answers_at_once_while_the_longest_stop_strings_are_matched(live):
    """4 stop strings of the most characters allowed, never matching, checked at every token of a long answer:
    the event loop stays free (before: one 120,000-character stop string held /health for 2.6 s)."""
    stops = ["\u2603" * api.MAX_STOP_CHARS, "ab" * (api.MAX_STOP_CHARS // 2), "the " * (api.MAX_STOP_CHARS // 4),
             "e" * api.MAX_STOP_CHARS]
    threads, got = stream_texts(live, [{**GOOD, "max_tokens": 100, "stop": stops} for _ in range(4)])
    latencies = []
    with httpx.Client(base_url=live.url) as http:  # one connection: a new client costs tens of ms by itself
        while any(t.is_alive() for t in threads):
            start = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
    assert all(error is None for _, error in got) and len(latencies) > 3
    assert max(latencies) < 0.1, f"/health took up to {max(latencies) * 1e3:.0f} ms"


def test_a_non_streamed_request_is_cancelled_when_its_client_leaves(live):
    """Before: the row decoded to its end (116 tokens after the client left at 50 ms). Now it leaves within two steps."""
    rec = Recorder(live.engine, delay=0.02)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/completions", json={**GOOD, "max_tokens": 100}, timeout=0.1)
        steps_at_leave = live.engine.steps
        wait_idle(live.url)
        reason, produced, asked = rec.ended[-1]
        assert reason == "cancelled" and live.engine.steps - steps_at_leave <= 2, (produced, asked)
    finally:
        rec.undo()


def test_a_client_that_never_reads_holds_no_row(live, model, tok):
    """A streamed request whose client sends it and never reads: its row still ends when its answer does (the
    tokens wait in a queue bounded by max_tokens, the socket's buffer after it), and other requests are served."""
    body = json.dumps({**GOOD, "max_tokens": 100, "stream": True}).encode()
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        other = httpx.post(live.url + "/v1/completions", json=GOOD).json()
        assert other["choices"][0]["text"] == tok.decode(alone(model, tok.encode("The king").ids, 4), skip_special_tokens=True)
        assert wait_idle(live.url)["running"] == 0  # its answer is done, though nothing of it has been read


# ---- loading: the one command, Hugging Face directories --------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_serve_command_loads_a_checkpoint_and_answers(tmp_path, model, tok, tok_path):
    ckpt = tmp_path / "ckpt_best"
    weights.save_model(model, ckpt / "model.safetensors")
    shutil.copy(tok_path, ckpt / "tokenizer.json")  # found beside the checkpoint, as lesson 08's chat does
    port = free_port()
    proc = subprocess.Popen([sys.executable, "12_serve/serve.py", "--checkpoint", str(ckpt), "--port", str(port),
                             "--threads", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list()] == ["lillm"]
        out = client.completions.create(model="lillm", prompt="The king", max_tokens=8, temperature=0)
        assert out.choices[0].text == tok.decode(alone(model, tok.encode("The king").ids, 8), skip_special_tokens=True)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_a_hugging_face_directory_serves_the_same_answers(tmp_path, model, tok, tok_path):
    out = hf.export_hf(model, tok_path, tmp_path / "hf", chat_template=template.CHAT_TEMPLATE)
    loaded, loaded_tok, _ = weights.load_pair(out)  # what serve.py loads
    ids = tok.encode("Good night").ids
    engine = batching.Engine(loaded)
    r = batching.Request(ids, 10, stop_id=EOT)
    run_engine(engine, [r], [0])
    assert r.tokens == alone(model, ids, 10) and loaded_tok.encode("Good night").ids == ids


# ---- the chat page, in a real browser -------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run installs them)")
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=820,640"):
        options.add_argument(arg)
    d = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    yield d
    d.quit()


def test_the_chat_page_streams_answers_keeps_history_and_stops(live, browser, model, tok, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    rec = Recorder(live.engine, delay=0.03)  # ~30 tokens/s: slow enough to see the stream and to press Stop
    d, wait = browser, WebDriverWait(browser, 30)
    try:
        d.get(live.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "model").text == "lillm-test")
        for field, value in (("temperature", "0"), ("max-tokens", "12")):
            d.find_element(By.ID, field).clear()
            d.find_element(By.ID, field).send_keys(value)
        d.execute_script("""window.seen = [];  // every length the answer's text takes while it streams
            new MutationObserver(() => { const a = document.querySelectorAll('.message.assistant');
              if (a.length) window.seen.push(a[a.length - 1].textContent.length); })
            .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")

        def say(text):
            d.find_element(By.ID, "input").send_keys(text)
            d.find_element(By.ID, "send").click()
            return d.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]

        history = [{"role": "user", "content": "Who says this?"}]
        answer = say("Who says this?")
        wait.until(lambda d: answer.get_attribute("data-state") == "done")
        want = tok.decode(alone(model, chat_ids(tok, history), 12), skip_special_tokens=True)
        assert answer.get_attribute("textContent") == want
        assert len({n for n in d.execute_script("return window.seen") if n}) > 2, "the answer should appear piece by piece"

        history += [{"role": "assistant", "content": want}, {"role": "user", "content": "And then?"}]
        answer = say("And then?")  # the second turn is answered with the whole conversation as its prompt
        wait.until(lambda d: answer.get_attribute("data-state") == "done")
        assert answer.get_attribute("textContent") == tok.decode(alone(model, chat_ids(tok, history), 12), skip_special_tokens=True)

        d.find_element(By.ID, "max-tokens").clear()
        d.find_element(By.ID, "max-tokens").send_keys("100")  # prompt + 100 > the window of 128: the page drops old turns
        answer = say("Good night")
        wait.until(lambda d: len(answer.get_attribute("textContent")) > 3)
        assert d.find_elements(By.CSS_SELECTOR, ".message.note")
        assert d.find_element(By.ID, "stop").is_displayed() and not d.find_element(By.ID, "send").is_displayed()
        d.find_element(By.ID, "stop").click()
        wait.until(lambda d: answer.get_attribute("data-state") == "stopped")
        stopped_at = answer.get_attribute("textContent")
        assert d.find_element(By.ID, "send").is_displayed() and not d.find_element(By.ID, "stop").is_displayed()
        wait_idle(live.url)
        assert rec.ended[-1][0] == "cancelled" and rec.ended[-1][1] < 100  # the server freed the row early
        assert answer.get_attribute("textContent") == stopped_at
        d.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 1000
        d.find_element(By.ID, "new-chat").click()
        assert not d.find_elements(By.CSS_SELECTOR, ".message")
    finally:
        rec.undo()
