"""OpenAI's wire format: request models (pydantic), the error body, and the response / chunk builders.

Owns the shape of JSON only: nothing here touches the engine. Field names, defaults and error bodies follow OpenAI's
API reference (completions, chat completions, streaming chunks) so that its clients and lm-eval's `local-completions`
work unchanged; unknown fields are ignored, as OpenAI does. Extensions (vLLM's names): `top_k`, `stop_token_ids`,
`return_token_ids`, `reasoning_content` in chat messages and deltas.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_LOGPROBS = 20           # OpenAI caps chat top_logprobs at 20 (completions at 5; we allow 20 for both)
MAX_N = 16


class ApiError(Exception):
    """An error answered with OpenAI's body {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")       # OpenAI ignores fields it does not know; so do we

    model: str | None = None                        # None: the one model served
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1)                    # extension; 0 and -1 (vLLM's "off") disable it
    stop: str | list[str] | None = Field(None, validate_default=True)   # a list once validated
    stop_token_ids: list[int] | None = None          # extension
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_token_ids: bool = False                   # extension: each choice (and chunk) carries its token ids

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        v = [v] if isinstance(v, str) else list(v or [])
        if len(v) > 16 or any(not s for s in v):
            raise ValueError("at most 16 non-empty stop strings")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)       # None: OpenAI's default (16); 0 only with echo
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request, one per batch entry (a string, token ids, a list of either)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p) or [""]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are an error (this server serves a text model)."""
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text":
                    raise ApiError(400, f"content part of type {part.get('type')!r} is not supported; this model "
                                        "reads text only", param="messages")
                parts.append(str(part.get("text", "")))
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)        # OpenAI's default for chat: up to the context
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a request body; every failure is an ApiError(400) whose param names the offending field."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", param=None, code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = [str(x) for x in err["loc"] if not _union_branch(x)]
        param = ".".join(loc) or None
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], (dict, list)) else ""
        msg = err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {msg}{got}" if param else f"{msg}{got}", param=param,
                       code="invalid_value" if err["type"] != "missing" else "missing_field") from None


_ENGINE_NAMES = {"max_new_tokens": "max_tokens"}


def param_of(message: str) -> str | None:
    """The request field an engine / SamplingParams error names ("top_k=... must ..." -> "top_k")."""
    m = re.match(r"(\w+)=", message)
    return _ENGINE_NAMES.get(m.group(1), m.group(1)) if m else None


def _union_branch(x) -> bool:
    # pydantic names the union member it tried ("str", "list[int]", "function-after[...]") inside the location
    return isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool"))


# ---- responses -------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(obj: dict[str, Any] | str) -> bytes:
    """One Server-Sent Event: `data: {json}` and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")
