"""The OpenAI API's shape: what a request may hold (checked where it enters), the answer objects and their
stream chunks, OpenAI's error body (every error of the server answers in it: add_error_handlers; the Gate checks
the API key and the body's size before any route), and TextStream (token ids -> text pieces, linear in the answer).

Every field is checked here, so that nothing a client sends can fail later inside the engine, beside
other requests: a known role, valid Unicode, a seed in [0, 2**63), at most 4 stop strings of 256
characters. Fields lilLM does not use are ignored; n > 1, logprobs and tools are refused (notes.md, 6-7).
"""

import json
import secrets
import time
import uuid
from typing import Annotated, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator
from starlette.exceptions import HTTPException

ROLES = ("system", "user", "assistant")  # lesson 08's template: the roles a chat may hold
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 256
UNION_TAGS = ("str", "int", "float", "bool", "list", "dict")  # pydantic's names for the members of a union


class APIError(Exception):
    """An error the client caused (4xx) or the server's state (429, 503, 500): answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate, \\ud800-\\udfff)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
StopString = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS), AfterValidator(_unicode)]


class StreamOptions(BaseModel):
    include_usage: bool = False  # one more chunk before [DONE]: empty choices, the usage


class Sampling(BaseModel):
    """Fields both endpoints share. OpenAI's defaults: temperature 1, top_p 1."""
    model_config = ConfigDict(extra="ignore")  # fields lilLM does not use are ignored, as the API's servers do
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)  # torch.Generator.manual_seed's range
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1  # one choice per request
    logprobs: Literal[False, None] = None

    def stop_strings(self) -> list:
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name"
    role: str
    content: Text | list[TextPart]  # a list of text parts is joined into one string

    @field_validator("role")
    @classmethod
    def known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role[:40]!r} (expected one of {', '.join(ROLES)})")
        return role

    def plain(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    tools: None = None  # no tool calls


class CompletionRequest(Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]  # one string (n = 1)
    max_tokens: int | None = Field(16, ge=1)  # the legacy endpoint's default

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextStream:
    """Token ids in, text pieces out: whole UTF-8 characters only, cut at the first stop string.

    ids[prefix:read] were decoded already and are the context of the next decode (a tokenizer may spell a
    token differently at the start of a text); ids[read:] are not out yet. `held` is text kept back because
    it may be the start of a stop string. A push decodes O(1) tokens and searches O(longest stop) characters.
    """

    def __init__(self, tokenizer, stop: list = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids, self.prefix, self.read, self.held = [], 0, 0, ""
        self.stopped = False  # a stop string was found: nothing more comes out

    def push(self, token: int) -> str:
        """The new printable text after one more token ("" while a character or a possible stop is unfinished)."""
        self.ids.append(token)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end: whatever is left (a character that never finished shows as U+FFFD)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        seen = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if not final and (len(text) <= len(seen) or text.endswith("\ufffd")):  # an unfinished UTF-8 character
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        text = self.held + text[len(seen):]
        hits = [h for h in (text.find(s) for s in self.stop) if h >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        # Hold back the longest tail that could still grow into a stop string.
        keep = 0 if final else max((n for s in self.stop for n in range(1, min(len(s), len(text) + 1))
                                    if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]


class Reply:
    """One request's answer objects: the whole answer, or its stream's chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id, self.created = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], int(time.time())

    def _wrap(self, obj: str, **fields) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, **fields}

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        choice = {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}
        return self._wrap("chat.completion" if self.chat else "text_completion", choices=[choice], usage=usage)

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict:
        """One piece of the stream. Chat: the first chunk carries the role, the last an empty delta."""
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        content = {"delta": delta} if self.chat else {"text": text or ""}
        choice = {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}
        return self._wrap("chat.completion.chunk" if self.chat else "text_completion", choices=[choice])

    def usage_chunk(self, usage: dict) -> dict:
        return self._wrap("chat.completion.chunk" if self.chat else "text_completion", choices=[], usage=usage)


def sse(obj) -> str:
    """One Server-Sent Event: `data: <json>` and a blank line (the event's end)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


class Gate:
    """Runs before any route, on the raw request: the API key on /v1/*, and the body's declared size."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        error = self.check(scope) if scope["type"] == "http" else None
        if error:
            return await JSONResponse(error.body(), error.status)(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, scope) -> APIError | None:
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):  # constant time
                return APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
                                code="invalid_api_key")
        if scope["method"] == "POST":
            length = headers.get(b"content-length", b"")
            if not length.isdigit():  # bodies of unknown size (chunked) are refused rather than read without bound
                return APIError(411, "a POST needs a Content-Length header", code="length_required")
            if int(length) > self.max_body_bytes:
                return APIError(413, f"the body has {int(length)} bytes; this server takes at most {self.max_body_bytes}",
                                code="body_too_large")
        return None


def add_error_handlers(app) -> None:
    """Every error in OpenAI's shape: ours (APIError), FastAPI's validation (422 -> 400), unknown paths, bugs (500)."""

    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        return JSONResponse(e.body(), e.status, headers={"Retry-After": "1"} if e.status == 429 else None)

    @app.exception_handler(RequestValidationError)  # FastAPI's 422: OpenAI answers 400
    async def on_invalid(request, e: RequestValidationError):
        # A field of several shapes (stop: a string or a list) fails once per shape: the deepest says the most.
        first = max(e.errors(), key=lambda err: len(err["loc"]))
        if first["type"] == "json_invalid":
            return await on_api_error(request, APIError(400, f"the body is not valid JSON ({first['ctx']['error']})"))
        loc = [str(x) for x in first["loc"] if isinstance(x, int) or x != "body" and x.isidentifier() and x not in UNION_TAGS]
        return await on_api_error(request, APIError(400, f"{'.'.join(loc) or 'body'}: {first['msg']}", loc[0] if loc else None))

    @app.exception_handler(HTTPException)  # unknown paths and methods, in the same shape
    async def on_http(request, e: HTTPException):
        return await on_api_error(request, APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def on_bug(request, e: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(), 500)
