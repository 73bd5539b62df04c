"""The OpenAI API's shape: what a request may hold, what the answer looks like, and text streamed safely.

    POST /v1/chat/completions  {"model", "messages": [{"role", "content"}], "max_tokens", "temperature", "top_p",
                                "stop", "seed", "stream", "stream_options": {"include_usage"}}
        -> {"object": "chat.completion", "choices": [{"message": {"role": "assistant", "content"}, "finish_reason"}],
            "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
    POST /v1/completions       the same with "prompt": str instead of messages (base models)
        -> {"object": "text_completion", "choices": [{"text", "finish_reason"}], "usage"}
    stream: true               Server-Sent Events, one `data: {json}\\n\\n` per piece of text
        -> chat.completion.chunk {"choices": [{"delta": {"content"}}]} / text_completion {"choices": [{"text"}]},
           the last with finish_reason, then `data: [DONE]`
    any error                  a 4xx/5xx status and {"error": {"message", "type", "param", "code"}}

Fields the official client may send that lilLM does not use (user, presence_penalty, frequency_penalty,
logit_bias, ...) are ignored; n > 1, logprobs and tools are refused rather than silently dropped.

TextStream turns token ids into text pieces: a byte-level BPE token can end inside a multi-byte UTF-8
character, so a piece is only released once its characters are whole (lesson 06's stream_text); and
text that might be the start of a stop string is held back until it is clear that it is not.
"""

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error the client caused (4xx) or the server's state (429, 503): answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False  # one more chunk before [DONE]: empty choices, the usage


class Sampling(BaseModel):
    """Fields both endpoints share. OpenAI's defaults: temperature 1, top_p 1."""
    model_config = ConfigDict(extra="ignore")  # fields lilLM does not use are ignored, as the API's servers do
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1  # one choice per request
    logprobs: Literal[False, None] = None

    def stop_strings(self) -> list:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"'stop' takes at most 4 strings, got {len(stop)}", "stop")
        return [s for s in stop if s]


class ChatRequest(Sampling):
    messages: list[dict]
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    tools: None = None  # no tool calls


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # the legacy endpoint's default

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise APIError(400, f"'prompt' must be one string (n = 1), got a list of {len(self.prompt)}", "prompt")
        return self.prompt[0]


def plain_messages(messages: list) -> list:
    """Content given as a list of text parts ([{"type": "text", "text": ...}]) joined into one string."""
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            m = {**m, "content": "".join(str(p.get("text", "")) for p in content)}
        out.append({k: m[k] for k in ("role", "content") if k in m} if isinstance(m, dict) else m)
    return out


class TextStream:
    """Token ids in, text pieces out: whole UTF-8 characters only, cut at the first stop string."""

    def __init__(self, tokenizer, stop: list = ()):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids, self.text, self.sent = [], "", 0  # ids so far; their decoded text; how much of it went out
        self.stopped = False  # a stop string was found: nothing more comes out

    def push(self, token: int) -> str:
        """The new printable text after one more token ("" while a character or a possible stop string is unfinished)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 character: wait for its next byte
            return ""
        self.text = text
        return self._release(final=False)

    def flush(self) -> str:
        """At the end: whatever is left (a character that never finished shows as U+FFFD)."""
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        text, end = self.text, len(self.text)
        hits = [h for h in (text.find(s) for s in self.stop) if h >= 0]
        if hits:
            self.stopped, end = True, min(hits)
        elif not final:  # hold back a tail that could still grow into a stop string
            end -= max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        piece = text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Reply:
    """Builds one request's answer objects: the whole answer, or its SSE chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish_reason: str, use: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice], "usage": use}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict:
        """One piece of the stream. Chat: the first chunk carries the role, the last an empty delta."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, use: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [], "usage": use}


def sse(obj) -> str:
    """One Server-Sent Event: `data: <json>` and a blank line (the event's end)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
