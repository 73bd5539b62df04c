"""An OpenAI-compatible server for lilLM: FastAPI routes over batching.py's engine, and a chat page at /.

    python 12_serve/serve.py --checkpoint out/sft/ckpt_best        # http://127.0.0.1:8000: the chat page, the API at /v1
    python 12_serve/serve.py --checkpoint out/ckpt_best             # a base model: use /v1/completions
    python 12_serve/serve.py --checkpoint out/sft/hf --host 0.0.0.0 --api_key SECRET   # reachable from other machines

Any OpenAI client then talks to it: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="SECRET or anything").
A request (notes.md, 1): checked, rendered (lesson 08's template), queued for the engine (full: 429); its tokens come
back to the event loop as text (api.TextStream), sent as SSE or whole. Every size a client controls is bounded; binds
127.0.0.1. Left out on purpose: TLS, rate limits per key.
"""

import argparse
import asyncio
import contextlib
import ipaddress
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
batching = import_module("12_serve.batching")
api = import_module("12_serve.api")
template = import_module("08_sft.template")
weights = import_module("06_model.weights")
PAGE = Path(__file__).resolve().parent / "index.html"
CHARS = "characters, more than that many tokens can hold"


@dataclass
class Limits:
    max_prompt_tokens: int | None = None  # None: the model's window less one
    max_tokens: int | None = None  # the largest max_tokens a request may ask for; None: the window
    max_messages: int = 64
    max_body_bytes: int = 1 << 20


class Answer:
    """One request in flight: the engine's tokens arrive on an asyncio.Queue and leave as text pieces."""

    def __init__(self, req, events: asyncio.Queue, text: api.TextStream, reply: api.Reply):
        self.req, self.events, self.text, self.reply = req, events, text, reply

    async def pieces(self):
        try:
            while (token := await self.events.get()) is not None:
                if piece := self.text.push(token):
                    yield piece
                if self.text.stopped:  # a stop string: the rest is not sent, the row leaves at the next step
                    return
            if self.req.finish_reason == "error":
                raise api.APIError(500, f"the model failed on this request ({self.req.error}); other requests are "
                                   "unaffected", type="server_error", code="engine_error")
            yield self.text.flush()
        finally:
            self.req.cancelled = True  # also when the client went away: a closed stream lands here

    def finish(self) -> tuple:
        """(finish_reason, usage) once the answer has ended."""
        n, m = len(self.req.prompt), len(self.text.ids)  # the prompt's tokens, the answer's (</s> included)
        usage = {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}
        return "stop" if self.text.stopped else self.req.finish_reason, usage

    async def events_sse(self, include_usage: bool):
        """The stream: the role (chat), the text as it comes, the finish reason, the usage if asked, [DONE]."""
        if self.reply.chat:
            yield api.sse(self.reply.chunk(role=True))
        try:
            async for piece in self.pieces():
                if piece:
                    yield api.sse(self.reply.chunk(piece))
            reason, usage = self.finish()
            yield api.sse(self.reply.chunk(finish_reason=reason))
            if include_usage:
                yield api.sse(self.reply.usage_chunk(usage))
        except api.APIError as e:  # too late for a status code: the error is an event of the stream
            yield api.sse(e.body())
        yield api.sse("[DONE]")

    async def whole(self, request: Request) -> dict:
        """The answer in one piece; the row leaves at the next step if the client hangs up before it is ready."""
        async def cancel_on_disconnect():
            while (await request.receive())["type"] != "http.disconnect":  # the body is read: only this can come
                pass
            self.req.cancelled = True

        watcher = asyncio.create_task(cancel_on_disconnect())
        try:
            text = "".join([piece async for piece in self.pieces()])
        finally:
            watcher.cancel()
        return self.reply.whole(text, *self.finish())


def create_app(engine, tokenizer, name: str = "lillm", api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app serving `engine`'s model; the engine thread runs while the app does (its lifespan)."""
    cfg, limits, created = engine.model.config, limits or Limits(), int(time.time())
    max_prompt = min(limits.max_prompt_tokens or cfg.max_seq_len, cfg.max_seq_len - 1)
    max_tokens_limit = min(limits.max_tokens or cfg.max_seq_len, cfg.max_seq_len - 1)
    # No token spells more characters than the longest one: a longer text cannot fit, and is refused untokenized.
    max_prompt_chars = max_prompt * max(len(tokenizer.decode([i])) for i in range(tokenizer.get_vocab_size()))
    stop_id = tokenizer.token_to_id(template.EOT)  # </s>: the end of a document and of a chat turn
    try:
        fmt = template.ChatFormat(tokenizer)
    except ValueError:  # a tokenizer without lesson 01's role tokens (an imported Llama): completions only
        fmt = None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        stop = threading.Event()
        thread = threading.Thread(target=engine.run, args=(stop,), name="engine", daemon=True)
        thread.start()
        yield
        stop.set()
        thread.join()

    app = FastAPI(title="lilLM", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(api.Gate, api_key=api_key, max_body_bytes=limits.max_body_bytes)

    api.add_error_handlers(app)

    card = {"id": name, "object": "model", "created": created, "owned_by": "lillm"}

    def check_model(model: str):
        if model != name:
            raise api.APIError(404, f"The model '{model}' does not exist; this server has '{name}'", "model", "model_not_found")

    def check_length(n: int, limit: int, unit: str, param: str):
        if n > limit:
            raise api.APIError(400, f"the prompt has {n:,} {unit}; this server takes at most {max_prompt} tokens", param,
                               "context_length_exceeded")

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "running": len(engine.rows), "waiting": engine.queued(),
                "max_batch": engine.max_batch, "max_waiting": engine.waiting.maxsize, "policy": engine.policy,
                "steps": engine.steps, "window": cfg.max_seq_len, "chat": fmt is not None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        check_model(model_id)
        return card

    @app.post("/v1/chat/completions")
    async def chat_completions(body: api.ChatRequest, request: Request):
        check_model(body.model)
        if fmt is None:
            raise api.APIError(400, "this model's tokenizer has no chat roles (lesson 01's <r0>..<r2>): use /v1/completions")
        if len(body.messages) > limits.max_messages:
            raise api.APIError(400, f"{len(body.messages)} messages; this server takes at most {limits.max_messages}", "messages")
        messages = [m.plain() for m in body.messages]
        check_length(sum(len(m["content"]) for m in messages), max_prompt_chars, CHARS, "messages")
        try:
            ids, _ = fmt.encode(messages, add_generation_prompt=True)
        except ValueError as e:  # a forged special token, a misplaced system turn
            raise api.APIError(400, str(e), "messages") from None
        return await start(body, request, ids, True, body.max_tokens or body.max_completion_tokens, "messages")

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, request: Request):
        check_model(body.model)
        check_length(len(body.text()), max_prompt_chars, CHARS, "prompt")
        if not (ids := tokenizer.encode(body.text()).ids):
            raise api.APIError(400, "'prompt' is empty", "prompt")
        return await start(body, request, ids, False, body.max_tokens, "prompt")

    async def start(body, request: Request, ids: list, chat: bool, max_tokens: int | None, prompt_param: str):
        """Check the lengths, queue the request, answer: a stream of events, or the whole answer once it ends."""
        check_length(len(ids), max_prompt, "tokens", prompt_param)
        room = cfg.max_seq_len - len(ids)  # positions left for the answer
        if max_tokens is not None and max_tokens > max_tokens_limit:
            raise api.APIError(400, f"max_tokens is {max_tokens}; this server allows at most {max_tokens_limit}", "max_tokens")
        if max_tokens is not None and max_tokens > room:
            raise api.APIError(400, f"This model's maximum context length is {cfg.max_seq_len} tokens; you requested "
                               f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} for the completion)",
                               "max_tokens", "context_length_exceeded")
        max_new = max_tokens or min(room, max_tokens_limit)
        # Bounded: at most max_new tokens and the end marker, however slowly the client reads (notes.md, 5: slow readers).
        loop, events = asyncio.get_running_loop(), asyncio.Queue(max_new + 1)

        def emit(token):  # called on the engine's thread: hand the token to this request's event loop
            with contextlib.suppress(RuntimeError):  # the loop has closed (the server is shutting down): no one listens
                loop.call_soon_threadsafe(events.put_nowait, token)

        req = batching.Request(ids, max_new, 1.0 if body.temperature is None else body.temperature, body.top_p,
                               body.seed, stop_id, emit)
        try:
            engine.submit(req)
        except queue.Full:
            raise api.APIError(429, f"the server is busy ({engine.waiting.maxsize} requests waiting); retry later",
                               type="rate_limit_error", code="queue_full") from None
        answer = Answer(req, events, api.TextStream(tokenizer, body.stop_strings()), api.Reply(chat, name))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(answer.events_sse(include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await answer.whole(request)

    return app


class InThread:
    """`app` served by uvicorn on a thread of this process (the tests, the benchmark). port 0: a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        # Trap: proto must say TCP. asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets whose proto is
        # IPPROTO_TCP; with proto 0, each response's body waited for the ACK of its headers: 44 ms per request.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))  # bound here, so the port is known before uvicorn starts and no one else takes it
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            time.sleep(0.01)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serve a lilLM model with the OpenAI API and a chat page.")
    parser.add_argument("--checkpoint", required=True, help="out/sft/ckpt_best, out/ckpt_best, LoRA adapters or a Hugging Face Llama dir")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the checkpoint, else data/tokenizer.json)")
    parser.add_argument("--base", default=None, help="base checkpoint for LoRA adapters (default: the one recorded in them)")
    parser.add_argument("--model_name", default="lillm", help="the model id clients name in their requests")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--max_batch", type=int, default=16, help="rows of the running batch (1: one request at a time)")
    parser.add_argument("--max_waiting", type=int, default=64, help="requests that may wait for a row; more get 429")
    parser.add_argument("--policy", choices=["continuous", "static"], default="continuous", help="when waiting requests join")
    parser.add_argument("--max_prompt_tokens", type=int, default=None, help="longest prompt (default: the window less one)")
    parser.add_argument("--max_tokens", type=int, default=None, help="largest max_tokens a request may ask (default: the window)")
    parser.add_argument("--max_messages", type=int, default=64, help="most messages in one chat request")
    parser.add_argument("--max_body_bytes", type=int, default=1 << 20, help="largest request body")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with weights.one_line_errors():
        if args.max_batch < 1 or args.max_waiting < 1:
            raise ValueError("--max_batch and --max_waiting must be at least 1")
        model, tokenizer, _ = weights.load_pair(args.checkpoint, args.tokenizer, args.device, args.base)
    engine = batching.Engine(model, args.max_batch, args.max_waiting, args.policy)
    limits = Limits(args.max_prompt_tokens, args.max_tokens, args.max_messages, args.max_body_bytes)
    app = create_app(engine, tokenizer, args.model_name, args.api_key, limits)
    try:
        public = not ipaddress.ip_address(args.host).is_loopback
    except ValueError:  # a host name
        public = args.host != "localhost"
    if public and not args.api_key:
        print(f"warning: {args.host} is reachable from other machines and there is no --api_key", file=sys.stderr)
    print(f"{model.num_params():,} parameters, window {model.config.max_seq_len}, batch {args.max_batch} ({args.policy}); "
          f"chat page http://{args.host}:{args.port}/  API http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main()
