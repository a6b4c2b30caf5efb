"""The OpenAI HTTP API as ``llm serve`` speaks it: request bodies, their checks, response bodies, errors.

Requests are validated strictly (a string where a number belongs, an unknown field, a temperature outside
[0, 2] are 400s, as OpenAI answers them). Fields the OpenAI client may send that change nothing here are
accepted and ignored (``user``, ``store``, ``metadata``, ``logprobs: false``, a zero penalty, ...); fields
asking for what this server cannot do (tools, logprobs, penalties, several choices, ...) are refused with
400 ``unsupported_parameter`` rather than silently ignored.

Every error is an ``APIError``, whose ``body()`` is OpenAI's ``{"error": {message, type, param, code}}``.
Messages are short, name the field, and never repeat what the client sent.

No torch and no HTTP framework here (an import-linter contract checks the torch part): ``llm.api_server`` does
the HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llm.inference.decoding import SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# below this a temperature decodes greedily, as 0 does: dividing logits by 1e-40 would overflow to inf/NaN
GREEDY_BELOW = 1e-4
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_PARAM_CHARS = 40  # of a field name quoted in an error message (an unknown one is the client's text)


class APIError(Exception):
    """A request that fails with ``status``; ``body()`` is the OpenAI error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(err: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field (pydantic's messages name the constraint,
    never the input)."""
    first = err.errors()[0]
    param = ".".join(str(part)[:MAX_PARAM_CHARS] for part in first["loc"]) or None
    message = "unrecognized request argument" if first["type"] == "extra_forbidden" else first["msg"]
    message = message.removeprefix("Value error, ")  # our own validators' messages
    return invalid(f"{param}: {message}" if param else message, param)


# ---------------------------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class ChatMessage(_Strict):
    """One message; ``developer`` is OpenAI's newer name for ``system``. ``content`` is a string or a list
    of text parts (``[{"type": "text", "text": ...}]``), joined."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None  # accepted, not used: the chat template has no names

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, content: Any) -> Any:
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")
            return "".join(p["text"] for p in content)
        return content

    def template_message(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted, not used: no padding is added to chunks


class _GenerationRequest(_Strict):
    """The fields both endpoints share."""

    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, description="not OpenAI's, as vLLM accepts it: the k most likely tokens")
    min_tokens: int | None = Field(None, ge=0, description="not OpenAI's, as vLLM accepts it: no end of the "
                                   "answer (stop ids) before this many tokens; stop strings still apply")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # OpenAI fields accepted and ignored whatever their value (they do not change the tokens)
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # OpenAI fields accepted only at their neutral value (``unsupported`` names the first one that is not)
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    logprobs: Any = None

    NEUTRAL: ClassVar[dict[str, tuple]] = {"n": (1,), "presence_penalty": (0,), "frequency_penalty": (0,),
                                           "logit_bias": ({},), "logprobs": (False,)}

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
        return stop

    def check_supported(self) -> None:
        """Raises APIError 400 ``unsupported_parameter`` naming the first field set to a value this server
        cannot honour."""
        for field, neutral in self.NEUTRAL.items():
            value = getattr(self, field)
            if value is not None and value not in neutral:
                allowed = " or ".join(json.dumps(v) for v in neutral)
                what = f"only {allowed} is supported" if allowed else "not supported by this server"
                raise invalid(f"{field}: {what}", field, "unsupported_parameter")

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens; it wins
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None  # without tools there is nothing to run in parallel
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    NEUTRAL = {**_GenerationRequest.NEUTRAL, "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",),
                "functions": ([],), "function_call": ("none",), "response_format": ({"type": "text"},),
                "modalities": (["text"],), "audio": (), "prediction": (), "reasoning_effort": (),
                "web_search_options": ()}

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: ``prompt`` is a string (or a list holding one string)."""

    prompt: str
    echo: bool | None = None
    suffix: Any = None
    best_of: Any = None

    NEUTRAL = {**_GenerationRequest.NEUTRAL, "logprobs": (0,), "echo": (False,), "suffix": (), "best_of": (1,)}

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise ValueError("must be a string or a list of one string (token ids and batches are not supported)")
            return prompt[0]
        return prompt

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


Request = ChatCompletionRequest | CompletionRequest


def lone_surrogate(data: Any) -> str | None:
    """Where a decoded JSON value holds a lone surrogate (``"\\ud800"``, which JSON can spell but UTF-8 cannot
    encode): the dotted path of the first such string, ``"<path>.<a field name>"`` for a key, or None."""
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:  # a stack, not recursion: the body may nest as deep as json.loads allows
        path, value = todo.pop()
        if isinstance(value, str):
            if not value.isascii() and not _encodable(value):
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _encodable(key):
                    return _join(path, "<a field name>")
                todo.append((_join(path, key), item))
        elif isinstance(value, list):
            todo.extend((_join(path, str(i)), item) for i, item in enumerate(value))
    return None


def _join(path: str, part: str) -> str:
    return f"{path}.{part}" if path else part


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_request(kind: type[Request], data: Any) -> Request:
    """Validate a decoded JSON body. Raises APIError 400 for a bad or unsupported field, or a string that is
    not valid Unicode (a lone surrogate), naming the field."""
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object")
    where = lone_surrogate(data)
    if where is not None:
        param = ".".join(part[:MAX_PARAM_CHARS] for part in where.split("."))
        raise invalid(f"{param}: not valid Unicode (a lone surrogate)", param, "invalid_unicode")
    try:
        request = kind.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None
    request.check_supported()
    return request


def sampling_params(request: Request, *, default_max_tokens: int, max_tokens: int,
                    stop_ids: Iterable[int]) -> SamplingParams:
    """The engine's SamplingParams for ``request``. Raises APIError 400 when it asks for more than ``max_tokens``
    new tokens.

    OpenAI's defaults: temperature 1, top_p 1 (no cut). A temperature under ``GREEDY_BELOW`` decodes greedily;
    a seed is taken modulo 2**64 (numpy's generators take non-negative seeds; int64 seeds stay distinct).
    """
    wanted = request.max_new_tokens() or default_max_tokens
    if wanted > max_tokens:
        param = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
        raise invalid(f"{param}: at most {max_tokens} on this server", param)
    temperature = 1.0 if request.temperature is None else request.temperature
    return SamplingParams(
        max_new_tokens=wanted,
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_k=request.top_k,
        top_p=None if request.top_p is None or request.top_p >= 1.0 else request.top_p,
        seed=None if request.seed is None else request.seed % 2**64,
        stop_ids=tuple(stop_ids),
        min_new_tokens=min(request.min_tokens or 0, wanted),
    )


# ---------------------------------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(head: dict[str, Any], text: str, finish_reason: str, token_usage: dict) -> dict[str, Any]:
    """A ``chat.completion``; ``head`` holds ``id``, ``created`` and ``model``."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": None,
              "finish_reason": finish_reason}
    return {**head, "object": "chat.completion", "choices": [choice], "usage": token_usage}


def chat_chunk(head: dict[str, Any], delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {**head, "object": "chat.completion.chunk", "choices": [choice]}


def completion(head: dict[str, Any], text: str, finish_reason: str | None,
               token_usage: dict | None = None) -> dict[str, Any]:
    """A ``text_completion`` (whole, or one streamed chunk of it when ``finish_reason`` is None)."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    body = {**head, "object": "text_completion", "choices": [choice]}
    return {**body, "usage": token_usage} if token_usage is not None else body


def usage_chunk(head: dict[str, Any], kind: str, token_usage: dict) -> dict[str, Any]:
    """The last chunk of a stream asked with ``stream_options.include_usage``: no choices, the usage."""
    return {**head, "object": kind, "choices": [], "usage": token_usage}
