"""The three line formats of a prompt file, parsed and validated one line at a time.

    {"prompt": "...", <sampling>}                 a plain completion
    {"messages": [{"role", "content"}], <sampling>} a chat (the worker applies the template)
    {"custom_id", "method": "POST", "url", "body"} an OpenAI batch request line, for
                                                   /v1/chat/completions or /v1/completions

<sampling> is any of max_tokens, temperature, top_p, top_k, seed, stop; plain lines may also
carry custom_id and model. Every problem is reported as (field, reason); the caller adds the
file name and line number. Parsing never touches Redis, so a whole file is checked before any
of it is enqueued.

Numbers must be finite and within what the engine can take: temperature >= 0, top_p in (0, 1],
top_k in 0..2**31-1, seed in 0..2**63-1, max_tokens 1..limits.max_output_tokens: the ranges
engine.request.SamplingParams accepts, so that a line that passes here cannot fail in a worker.
(Python's json reads Infinity, NaN and 1e400 as floats; they are refused here, not in a worker.)
A line may nest at most MAX_JSON_DEPTH arrays/objects deep.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENDPOINT_CHAT: Final = "/v1/chat/completions"
ENDPOINT_COMPLETIONS: Final = "/v1/completions"
ENDPOINTS: Final = (ENDPOINT_CHAT, ENDPOINT_COMPLETIONS)

Role = Literal["system", "user", "assistant"]

# The engine's bounds (engine.request, which the producer does not import): a seed is a
# non-negative 64-bit integer; top_k reaches torch as a 32-bit integer at most (0: no cut-off).
SEED_MIN: Final = 0
SEED_MAX: Final = 2**63 - 1
TOP_K_MAX: Final = 2**31 - 1
# Arrays/objects a line may nest. The formats need 5 (an OpenAI batch line's body, messages, a
# message, its content parts, a part); anything deeper is refused before it is recursed into,
# so a hostile line is a line error, not a RecursionError.
MAX_JSON_DEPTH: Final = 32

# Sampling values used when a line leaves them out (max_tokens comes from the deployment's
# limits.default_max_tokens). temperature 1 / top_p 1 / top_k 0 is plain sampling, as OpenAI.
DEFAULT_TEMPERATURE: Final = 1.0
DEFAULT_TOP_P: Final = 1.0
DEFAULT_TOP_K: Final = 0

# OpenAI body keys that change nothing about the generated text: dropped.
IGNORED_BODY_KEYS: Final = frozenset({"model", "user", "metadata", "store", "service_tier"})


def _neutral_n(v: Any) -> bool:
    return v is None or (type(v) is int and v == 1)


def _neutral_false(v: Any) -> bool:
    return v is None or v is False


def _neutral_zero(v: Any) -> bool:
    return v is None or (type(v) in (int, float) and v == 0)


def _neutral_empty(v: Any) -> bool:
    return v is None or v == {} or v == []


def _neutral_text_format(v: Any) -> bool:
    return v is None or v == {"type": "text"}


# OpenAI body keys this service cannot honour: accepted only at the value that means "off",
# an error otherwise (they would change the results or their shape).
NEUTRAL_BODY_VALUES: Final = {
    "n": _neutral_n,
    "best_of": _neutral_n,
    "stream": _neutral_false,
    "stream_options": _neutral_empty,
    "logprobs": _neutral_false,
    "top_logprobs": _neutral_zero,
    "echo": _neutral_false,
    "suffix": lambda v: v is None or v == "",
    "presence_penalty": _neutral_zero,
    "frequency_penalty": _neutral_zero,
    "logit_bias": _neutral_empty,
    "tools": _neutral_empty,
    "tool_choice": lambda v: v is None or v == "none",
    "functions": _neutral_empty,
    "function_call": lambda v: v is None or v == "none",
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),
    "response_format": _neutral_text_format,
}

_JOB_ID_LINE = re.compile(r"L(\d+)")


def line_custom_id_collision(custom_id: str) -> int | None:
    """The line number whose default job id ("L<n>") this custom_id would take, if any."""
    m = _JOB_ID_LINE.fullmatch(custom_id)
    return int(m.group(1)) if m else None


class LineInvalid(ValueError):
    """One line failed validation; `problems` is a list of (field, reason)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f}: {r}" for f, r in problems))
        self.problems = problems


@dataclass(slots=True)
class ParsedLine:
    """A valid line, normalised to the job's request (see tasks.messages for the wire form)."""

    line: int
    custom_id: str | None
    prompt: str | None
    messages: list[dict[str, str]] | None
    sampling: dict[str, Any]
    endpoint: str | None
    model: str | None

    def request(self, priority: str) -> dict[str, Any]:
        """kwargs["request"] of the job's Celery message."""
        req: dict[str, Any] = (
            {"prompt": self.prompt} if self.messages is None else {"messages": self.messages}
        )
        req["sampling"] = self.sampling
        req["priority"] = priority
        req["endpoint"] = self.endpoint
        req["line"] = self.line
        req["custom_id"] = self.custom_id
        req["model"] = self.model
        return req


# --- pydantic models -----------------------------------------------------------------------

NonEmptyStr = Annotated[str, Field(min_length=1)]


class _StrictModel(BaseModel):
    # defer_build: a model's validator is built when it first validates a line, not at import;
    # a file uses one or two of the line models, and building all of them took most of this
    # module's import (it delays every `producer submit`).
    model_config = ConfigDict(extra="forbid", strict=True, defer_build=True)


def _check_stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError("must be a string or a list of strings")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return stops


class _Sampling(_StrictModel):
    # Upper bound: the deployment's limits.max_output_tokens, checked by LineParser._sampling.
    max_tokens: int | None = Field(default=None, ge=1)
    # Any finite temperature >= 0; one below about 1e-5 the engine treats as 0 (greedy).
    temperature: float = Field(default=DEFAULT_TEMPERATURE, ge=0, allow_inf_nan=False)
    top_p: float = Field(default=DEFAULT_TOP_P, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(default=DEFAULT_TOP_K, ge=0, le=TOP_K_MAX)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: list[str] = Field(default_factory=list)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        return _check_stop(value)


class _Message(_StrictModel):
    role: Role
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        # OpenAI allows content as a list of parts; only text parts can be served here.
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str) and set(part) == {"type", "text"}):
                raise ValueError("only text content parts ({type: text, text: ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)


class _PlainLine(_Sampling):
    custom_id: NonEmptyStr | None = None
    model: str | None = None


class PromptLine(_PlainLine):
    prompt: NonEmptyStr

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be only whitespace")
        return value


class MessagesLine(_PlainLine):
    messages: list[_Message] = Field(min_length=1)


class BatchRequestLine(_StrictModel):
    custom_id: NonEmptyStr
    method: Literal["POST"]
    url: Literal["/v1/chat/completions", "/v1/completions"]
    body: dict[str, Any]


class ChatBody(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionBody(_Sampling):
    prompt: NonEmptyStr

    @field_validator("prompt", mode="before")
    @classmethod
    def _single(cls, value: Any) -> Any:
        if isinstance(value, list):
            raise ValueError("only a single string prompt is supported, not a list")
        return value


# --- error messages ------------------------------------------------------------------------

_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "missing",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "too_short": "must not be empty",
    "string_too_short": "must not be empty",
    "finite_number": "must be a finite number",
}
# Error kinds whose reason shows the value given.
_SHOW_INPUT = frozenset({"greater_than_equal", "greater_than", "less_than_equal", "less_than",
                         "finite_number"})


def _problems(err: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for e in err.errors(include_url=False):
        field = prefix + ".".join(str(p) for p in e["loc"])
        kind = e["type"]
        if kind == "value_error":
            reason = str(e["msg"]).removeprefix("Value error, ")
        else:
            reason = _MESSAGES.get(kind) or str(e["msg"]).replace("Input should be", "must be", 1)
            if kind in _SHOW_INPUT:
                reason = f"{reason} (got {e['input']!r})"
        out.append((field or "<line>", reason))
    return out


# --- the parser ----------------------------------------------------------------------------


class LineParser:
    """Parses and validates lines against one deployment's limits.

    Args:
        max_output_tokens: the deployment's limits.max_output_tokens (largest max_tokens).
        default_max_tokens: max_tokens of a line that gives none.
    """

    def __init__(self, max_output_tokens: int, default_max_tokens: int) -> None:
        self.max_output_tokens = max_output_tokens
        self.default_max_tokens = default_max_tokens

    def parse(self, raw: bytes | str, line: int) -> ParsedLine:
        """One non-blank line -> ParsedLine; raises LineInvalid with every problem found."""
        try:
            # Decoding first spares json.loads its encoding detection; a byte order mark
            # (some editors write one on the first line) is not an error.
            text = raw.decode("utf-8-sig" if line == 1 else "utf-8") if isinstance(
                raw, bytes) else raw
            data = json.loads(text)
        except UnicodeDecodeError as err:
            raise LineInvalid([("<line>", f"not UTF-8: {err.reason}")]) from None
        except json.JSONDecodeError as err:
            raise LineInvalid([("<line>", f"invalid JSON: {err.msg} (column {err.pos + 1})")]
                              ) from None
        except RecursionError:
            # Nested so deep that the decoder itself gave up (thousands of levels).
            raise LineInvalid([(_deep_field_of_text(text), _TOO_DEEP)]) from None
        except ValueError as err:
            # An integer of more digits than Python converts (sys.get_int_max_str_digits).
            raise LineInvalid([("<line>", f"invalid JSON: {str(err).partition(';')[0]}")]
                              ) from None
        # No line of the formats comes near the depth limit; brackets are counted first (in C)
        # so that only a line with many of them (say a prompt full of code) is walked.
        if text.count("[") + text.count("{") > MAX_JSON_DEPTH:
            deep = _deep_field(data)
            if deep is not None:
                raise LineInvalid([(deep, _TOO_DEEP)])
        if not isinstance(data, dict):
            raise LineInvalid([("<line>", f"must be a JSON object, not {_json_type(data)}")])
        if "body" in data or "url" in data or "method" in data:
            return self._batch_line(data, line)
        if "messages" in data and "prompt" in data:
            raise LineInvalid([("prompt", "give either prompt or messages, not both")])
        model: type[PromptLine] | type[MessagesLine]
        if "messages" in data:
            model = MessagesLine
        elif "prompt" in data:
            model = PromptLine
        else:
            raise LineInvalid([("prompt", "missing (a line needs prompt or messages, or is an"
                                          " OpenAI batch request with custom_id, method, url,"
                                          " body)")])
        try:
            parsed = model.model_validate(data)
        except ValidationError as err:
            raise LineInvalid(_problems(err)) from None
        sampling = self._sampling(parsed, parsed.max_tokens, "max_tokens")
        if isinstance(parsed, PromptLine):
            return ParsedLine(line, parsed.custom_id, parsed.prompt, None, sampling, None,
                              parsed.model)
        return ParsedLine(line, parsed.custom_id, None, _dump_messages(parsed.messages),
                          sampling, None, parsed.model)

    def _batch_line(self, data: dict[str, Any], line: int) -> ParsedLine:
        try:
            req = BatchRequestLine.model_validate(data)
        except ValidationError as err:
            raise LineInvalid(_problems(err)) from None
        body: dict[str, Any] = {}
        problems: list[tuple[str, str]] = []
        model_name = req.body.get("model")
        for key, value in req.body.items():
            if key in IGNORED_BODY_KEYS:
                continue
            neutral = NEUTRAL_BODY_VALUES.get(key)
            if neutral is not None:
                if not neutral(value):
                    problems.append((f"body.{key}", f"not supported ({value!r})"))
                continue
            body[key] = value
        if model_name is not None and not isinstance(model_name, str):
            problems.append(("body.model", "must be a string"))
            model_name = None
        schema: type[ChatBody] | type[CompletionBody] = (
            ChatBody if req.url == ENDPOINT_CHAT else CompletionBody
        )
        parsed: ChatBody | CompletionBody | None = None
        try:
            parsed = schema.model_validate(body)
        except ValidationError as err:
            problems += _problems(err, "body.")
        if problems or parsed is None:
            raise LineInvalid(problems)
        max_tokens, field = parsed.max_tokens, "body.max_tokens"
        if isinstance(parsed, ChatBody) and parsed.max_completion_tokens is not None:
            if max_tokens is not None and max_tokens != parsed.max_completion_tokens:
                raise LineInvalid([("body.max_completion_tokens",
                                    "differs from body.max_tokens; give one of them")])
            max_tokens, field = parsed.max_completion_tokens, "body.max_completion_tokens"
        sampling = self._sampling(parsed, max_tokens, field)
        if isinstance(parsed, ChatBody):
            return ParsedLine(line, req.custom_id, None, _dump_messages(parsed.messages),
                              sampling, req.url, model_name)
        return ParsedLine(line, req.custom_id, parsed.prompt, None, sampling, req.url,
                          model_name)

    def _sampling(self, parsed: _Sampling, max_tokens: int | None, field: str) -> dict[str, Any]:
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        elif max_tokens > self.max_output_tokens:
            raise LineInvalid([(field, f"{max_tokens} exceeds this deployment's limit of"
                                       f" {self.max_output_tokens} (limits.max_output_tokens)")])
        return {
            "max_tokens": max_tokens,
            # + 0.0: a temperature of -0.0 becomes 0.0.
            "temperature": float(parsed.temperature) + 0.0,
            "top_p": float(parsed.top_p),
            "top_k": parsed.top_k,
            "seed": parsed.seed,
            "stop": parsed.stop,
        }


_TOO_DEEP: Final = f"nests deeper than {MAX_JSON_DEPTH} levels"


def _field_name(path: list[Any]) -> str:
    """How a depth error names its place: the line's key, or the body's key under "body";
    path holds the keys (indexes in arrays) from the line down, the first two at most."""
    if not path or not isinstance(path[0], str):
        return "<line>"  # the line itself is an array
    if path[0] == "body" and len(path) > 1:
        return f"body.{path[1]}"
    return path[0]


def _deep_field(data: Any) -> str | None:
    """Where a parsed line first nests deeper than MAX_JSON_DEPTH, or None if it does not.
    Walks the containers only, with a stack of its own (no recursion)."""
    if not isinstance(data, (dict, list)):
        return None
    stack: list[tuple[Any, int, list[Any]]] = [(data, 1, [])]
    while stack:
        value, depth, path = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in items:
            if isinstance(child, (dict, list)):
                child_path = path + [key] if len(path) < 2 else path
                if depth == MAX_JSON_DEPTH:
                    return _field_name(child_path)
                stack.append((child, depth + 1, child_path))
    return None


# A JSON string, or one structural character.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:,]')


def _deep_field_of_text(text: str) -> str:
    """_deep_field for a line too deep to parse: scans its tokens up to the depth limit."""
    # Per open container: [is_object, key or index of the current member].
    open_: list[list[Any]] = []
    last_string = ""
    for m in _JSON_TOKEN.finditer(text):
        token = m.group()
        if token[0] == '"':
            last_string = token
        elif token in "[{":
            if len(open_) == MAX_JSON_DEPTH:
                return _field_name([member for _, member in open_[:2]])
            open_.append([token == "{", 0])
        elif token in "]}":
            if open_:
                open_.pop()
        elif not open_:
            continue
        elif token == ":" and open_[-1][0]:
            try:
                open_[-1][1] = json.loads(last_string)
            except ValueError:
                open_[-1][1] = last_string
        elif token == "," and not open_[-1][0]:
            open_[-1][1] += 1
    return "<line>"


def _dump_messages(messages: list[_Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"
