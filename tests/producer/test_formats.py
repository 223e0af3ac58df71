"""Line formats and whole-file validation: every error kind, with its line and field."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import InvalidFileError, Producer
from producer.formats import (
    MAX_JSON_DEPTH,
    SEED_MAX,
    SEED_MIN,
    TOP_K_MAX,
    LineInvalid,
    LineParser,
)
from tests.producer.conftest import DEFAULT_MAX_TOKENS, MAX_OUTPUT_TOKENS

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER_HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def parser() -> LineParser:
    return LineParser(MAX_OUTPUT_TOKENS, DEFAULT_MAX_TOKENS)


def batch_line(body: dict[str, Any], url: str = CHAT, **top: Any) -> dict[str, Any]:
    return {"custom_id": "r1", "method": "POST", "url": url, "body": body, **top}


def problems(parser: LineParser, line: dict[str, Any] | str) -> list[tuple[str, str]]:
    raw = line if isinstance(line, str) else json.dumps(line)
    with pytest.raises(LineInvalid) as err:
        parser.parse(raw, 1)
    return err.value.problems


# --- valid lines -----------------------------------------------------------------------------

def test_prompt_line_gets_defaults(parser: LineParser) -> None:
    p = parser.parse('{"prompt": "Hello"}', 3)
    assert p.request("low") == {
        "prompt": "Hello",
        "sampling": {"max_tokens": DEFAULT_MAX_TOKENS, "temperature": 1.0, "top_p": 1.0,
                     "top_k": 0, "seed": None, "stop": []},
        "priority": "low", "endpoint": None, "line": 3, "custom_id": None, "model": None,
    }


def test_messages_line_with_sampling(parser: LineParser) -> None:
    p = parser.parse(
        '{"messages": [{"role": "system", "content": "Be brief."},'
        ' {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],'
        ' "custom_id": "c1", "max_tokens": 8, "temperature": 0, "top_p": 0.5, "top_k": 4,'
        ' "seed": 7, "stop": "\\n", "model": "m"}', 1)
    req = p.request("high")
    assert req["messages"] == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi"}]
    assert "prompt" not in req
    assert req["sampling"] == {"max_tokens": 8, "temperature": 0.0, "top_p": 0.5, "top_k": 4,
                               "seed": 7, "stop": ["\n"]}
    assert isinstance(req["sampling"]["temperature"], float)
    assert (req["custom_id"], req["model"], req["priority"]) == ("c1", "m", "high")


def test_openai_chat_line(parser: LineParser) -> None:
    p = parser.parse(json.dumps(batch_line({
        "model": "gpt-x", "messages": USER_HI, "max_completion_tokens": 12, "temperature": 0.2,
        "top_p": 0.9, "seed": 1, "stop": ["a", "b"], "top_k": 3, "user": "u1",
        "metadata": {"k": "v"}, "n": 1, "stream": False, "logprobs": False,
    })), 5)
    req = p.request("low")
    assert req["endpoint"] == CHAT and req["custom_id"] == "r1" and req["model"] == "gpt-x"
    assert req["messages"] == USER_HI
    assert req["sampling"] == {"max_tokens": 12, "temperature": 0.2, "top_p": 0.9, "top_k": 3,
                               "seed": 1, "stop": ["a", "b"]}


def test_openai_completions_line(parser: LineParser) -> None:
    p = parser.parse(json.dumps(
        batch_line({"model": "m", "prompt": "Once", "max_tokens": 5}, url=COMPLETIONS)), 2)
    req = p.request("low")
    assert req["prompt"] == "Once" and req["endpoint"] == COMPLETIONS
    assert req["sampling"]["max_tokens"] == 5


# --- invalid lines ---------------------------------------------------------------------------

@pytest.mark.parametrize(("line", "field", "reason"), [
    ("{not json", "<line>", "invalid JSON"),
    ("[1, 2]", "<line>", "must be a JSON object, not an array"),
    ('"text"', "<line>", "not a string"),
    ({"max_tokens": 3}, "prompt", "missing"),
    ({"prompt": "a", "temprature": 1}, "temprature", "unknown key"),
    ({"prompt": "a", "temperature": -0.5}, "temperature", "greater than or equal to 0"),
    ({"prompt": "a", "temperature": "hot"}, "temperature", "must be a number"),
    ({"prompt": "a", "top_p": 0}, "top_p", "greater than 0"),
    ({"prompt": "a", "top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({"prompt": "a", "top_k": -1}, "top_k", "greater than or equal to 0"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"prompt": "a", "max_tokens": MAX_OUTPUT_TOKENS + 1}, "max_tokens",
     "limits.max_output_tokens"),
    ({"prompt": "a", "max_tokens": 2.5}, "max_tokens", "must be an integer"),
    ({"prompt": "a", "max_tokens": "8"}, "max_tokens", "must be an integer"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens", "must be an integer"),
    ({"prompt": "a", "seed": 1.5}, "seed", "must be an integer"),
    ({"prompt": "a", "stop": [""]}, "stop", "must not be empty"),
    ({"prompt": "a", "stop": [1]}, "stop", "list of strings"),
    ({"prompt": "a", "custom_id": ""}, "custom_id", "must not be empty"),
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": "  \n"}, "prompt", "whitespace"),
    ({"prompt": 5}, "prompt", "must be a string"),
    ({"prompt": "a", "messages": USER_HI}, "prompt", "not both"),
    ({"messages": []}, "messages", "must not be empty"),
    ({"messages": "hi"}, "messages", "must be a list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role",
     "'system', 'user' or 'assistant'"),
    ({"messages": [*USER_HI, {"role": "user"}]}, "messages.1.content", "missing"),
    ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, "messages.0.name",
     "unknown key"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content", "only text content parts"),
    (batch_line({"messages": USER_HI}, method="GET"), "method", "'POST'"),
    (batch_line({"input": "x"}, url="/v1/embeddings"), "url", "/v1/chat/completions"),
    ({"method": "POST", "url": CHAT, "body": {"messages": USER_HI}}, "custom_id", "missing"),
    (batch_line({"messages": USER_HI}, extra=1), "extra", "unknown key"),
    (batch_line({"messages": USER_HI}) | {"body": []}, "body", "must be an object"),
    (batch_line({}), "body.messages", "missing"),
    (batch_line({"messages": USER_HI, "n": 2}), "body.n", "not supported"),
    (batch_line({"messages": USER_HI, "logprobs": True}), "body.logprobs", "not supported"),
    (batch_line({"messages": USER_HI, "stream": True}), "body.stream", "not supported"),
    (batch_line({"messages": USER_HI, "tools": [{"type": "function"}]}), "body.tools",
     "not supported"),
    (batch_line({"messages": USER_HI, "presence_penalty": 0.5}), "body.presence_penalty",
     "not supported"),
    (batch_line({"messages": USER_HI, "frobnicate": 1}), "body.frobnicate", "unknown key"),
    (batch_line({"messages": USER_HI, "temperature": -1}), "body.temperature",
     "greater than or equal to 0"),
    (batch_line({"messages": USER_HI, "max_tokens": MAX_OUTPUT_TOKENS + 1}), "body.max_tokens",
     "limits.max_output_tokens"),
    (batch_line({"messages": USER_HI, "max_completion_tokens": MAX_OUTPUT_TOKENS + 1}),
     "body.max_completion_tokens", "limits.max_output_tokens"),
    (batch_line({"messages": USER_HI, "max_tokens": 4, "max_completion_tokens": 5}),
     "body.max_completion_tokens", "differs"),
    (batch_line({"messages": USER_HI, "model": 3}), "body.model", "must be a string"),
    (batch_line({"prompt": ["a", "b"]}, url=COMPLETIONS), "body.prompt", "single string"),
    (batch_line({"prompt": ""}, url=COMPLETIONS), "body.prompt", "must not be empty"),
    (batch_line({"prompt": "a", "echo": True}, url=COMPLETIONS), "body.echo", "not supported"),
])
def test_invalid_line(parser: LineParser, line: dict[str, Any] | str, field: str,
                      reason: str) -> None:
    found = problems(parser, line)
    assert any(f == field and reason in r for f, r in found), found


# --- numbers: finite and in range, in every format ------------------------------------------

def sampling_variants(key: str, raw_value: str) -> list[tuple[str, str]]:
    """(line, field) of `key` set to the JSON text raw_value, in each of the three formats."""
    return [
        (f'{{"prompt": "a", "{key}": {raw_value}}}', key),
        (f'{{"messages": [{{"role": "user", "content": "a"}}], "{key}": {raw_value}}}', key),
        (f'{{"custom_id": "r", "method": "POST", "url": "{CHAT}", "body": {{"messages":'
         f' [{{"role": "user", "content": "a"}}], "{key}": {raw_value}}}}}', f"body.{key}"),
        (f'{{"custom_id": "r", "method": "POST", "url": "{COMPLETIONS}", "body": {{"prompt":'
         f' "a", "{key}": {raw_value}}}}}', f"body.{key}"),
    ]


BAD_NUMBERS = [
    # (key, JSON text of the value, what the reason says)
    ("temperature", "Infinity", "must be a finite number"),
    ("temperature", "-Infinity", "must be"),
    ("temperature", "1e400", "must be a finite number"),
    ("temperature", "NaN", "must be a finite number"),
    ("temperature", "1" + "0" * 400, "must be a number"),
    ("top_p", "NaN", "must be a finite number"),
    ("top_p", "Infinity", "must be a finite number"),
    ("top_p", "1e-400", "greater than 0"),
    ("top_p", "1.0000001", "less than or equal to 1"),
    ("top_k", str(TOP_K_MAX + 1), f"less than or equal to {TOP_K_MAX}"),
    ("top_k", str(2**64), "less than or equal to"),
    ("top_k", "true", "must be an integer"),
    ("top_k", "4.0", "must be an integer"),
    ("top_k", "1e400", "must be an integer"),
    ("seed", str(SEED_MAX + 1), f"less than or equal to {SEED_MAX}"),
    ("seed", str(SEED_MIN - 1), f"greater than or equal to {SEED_MIN}"),
    ("seed", "false", "must be an integer"),
    ("seed", "NaN", "must be an integer"),
    ("max_tokens", "Infinity", "must be an integer"),
    ("max_tokens", "NaN", "must be an integer"),
    ("max_tokens", "1e400", "must be an integer"),
    ("max_tokens", str(2**64), "limits.max_output_tokens"),
    ("max_tokens", "-1", "greater than or equal to 1"),
]


@pytest.mark.parametrize(("key", "raw_value", "reason"), BAD_NUMBERS)
def test_numbers_must_be_finite_and_in_range(parser: LineParser, key: str, raw_value: str,
                                             reason: str) -> None:
    for line, field in sampling_variants(key, raw_value):
        found = problems(parser, line)
        assert any(f == field and reason in r for f, r in found), (line, found)


@pytest.mark.parametrize("raw_value", ["Infinity", "NaN", "1e400", "0", "-3"])
def test_max_completion_tokens_follows_the_same_rules(parser: LineParser,
                                                      raw_value: str) -> None:
    line = (f'{{"custom_id": "r", "method": "POST", "url": "{CHAT}", "body": {{"messages":'
            f' [{{"role": "user", "content": "a"}}], "max_completion_tokens": {raw_value}}}}}')
    assert [f for f, _ in problems(parser, line)] == ["body.max_completion_tokens"]


@pytest.mark.parametrize(("key", "raw_value", "expected"), [
    ("temperature", "1e-6", 1e-6),  # below 1e-5: the engine samples greedily
    ("temperature", "5e-324", 5e-324),
    ("temperature", "-0.0", 0.0),
    ("temperature", "2", 2.0),
    ("top_p", "1", 1.0),
    ("top_p", "1e-300", 1e-300),
    ("top_k", str(TOP_K_MAX), TOP_K_MAX),
    ("seed", str(SEED_MAX), SEED_MAX),
    ("seed", str(SEED_MIN), SEED_MIN),
    ("seed", "0", 0),
    ("max_tokens", str(MAX_OUTPUT_TOKENS), MAX_OUTPUT_TOKENS),
])
def test_numbers_at_the_edges_are_accepted(parser: LineParser, key: str, raw_value: str,
                                           expected: float) -> None:
    for line, _ in sampling_variants(key, raw_value):
        value = parser.parse(line, 1).sampling[key]
        assert value == expected and type(value) is type(expected), line
    if key == "temperature":
        assert str(parser.parse(sampling_variants(key, raw_value)[0][0], 1)
                   .sampling[key]) != "-0.0"


def test_bounds_are_the_engines(parser: LineParser) -> None:
    # A line the producer accepts must not fail in the worker: the engine takes every edge
    # value accepted above, and the producer refuses what the engine would.
    from engine.request import MAX_SEED, MAX_TOP_K, SamplingParams

    assert (SEED_MIN, SEED_MAX, TOP_K_MAX) == (0, MAX_SEED, MAX_TOP_K)
    line = {"prompt": "a", "temperature": 1e-300, "top_p": 5e-324, "top_k": TOP_K_MAX,
            "seed": SEED_MAX, "max_tokens": MAX_OUTPUT_TOKENS, "stop": ["x"]}
    SamplingParams.from_dict(parser.parse(json.dumps(line), 1).sampling)
    SamplingParams.from_dict(parser.parse(json.dumps({"prompt": "a", "seed": 0}), 1).sampling)
    with pytest.raises(ValueError):
        SamplingParams(seed=SEED_MIN - 1)


def test_integer_of_too_many_digits_is_a_line_error(parser: LineParser) -> None:
    found = problems(parser, '{"prompt": "a", "max_tokens": ' + "9" * 5000 + "}")
    assert found[0][0] == "<line>" and "invalid JSON" in found[0][1] and "4300" in found[0][1]


# --- nesting ---------------------------------------------------------------------------------

def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    """A JSON value nested `depth` levels deep."""
    return open_ * depth + close * depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 5_000, 100_000])
def test_deep_nesting_is_a_line_error(parser: LineParser, depth: int) -> None:
    # The line's own object is the first level; `depth` more arrays go deeper than the limit.
    reason = f"nests deeper than {MAX_JSON_DEPTH} levels"
    assert problems(parser, '{"messages": ' + nested(depth) + "}") == [("messages", reason)]
    assert problems(parser, '{"prompt": "x", "stop": ["a", ' + nested(depth) + "]}") == [
        ("stop", reason)]
    assert problems(parser, nested(depth + 1)) == [("<line>", reason)]
    metadata = '{"k": ' * depth + "1" + "}" * depth
    line = ('{"custom_id": "r", "method": "POST", "url": "' + CHAT + '", "body": {"messages":'
            ' [{"role": "user", "content": "a"}], "metadata": ' + metadata + "}}")
    assert problems(parser, line) == [("body.metadata", reason)]


def test_nesting_up_to_the_limit_is_parsed(parser: LineParser) -> None:
    # Depth MAX_JSON_DEPTH exactly: not a depth error (the value is refused for what it is).
    found = problems(parser, '{"messages": ' + nested(MAX_JSON_DEPTH - 1) + "}")
    assert found and all("nests deeper" not in r for _, r in found)
    # Brackets inside strings are text, however many.
    p = parser.parse(json.dumps({"prompt": "{[" * 10_000, "stop": ["}]"]}), 1)
    assert p.prompt == "{[" * 10_000


def test_every_problem_of_a_line_is_reported(parser: LineParser) -> None:
    found = problems(parser, {"prompt": "", "temperature": -1, "foo": 1})
    assert {f for f, _ in found} == {"prompt", "temperature", "foo"}


# --- whole files -----------------------------------------------------------------------------

def test_errors_name_file_line_and_field(producer: Producer, rdb: redis.Redis,
                                         write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl([
        {"prompt": "ok"},
        "",
        {"prompt": "ok", "temperature": -1},
        "   ",
        "{broken",
        {"messages": [{"role": "bot", "content": "x"}]},
        {"prompt": "ok", "max_tokens": MAX_OUTPUT_TOKENS + 1},
    ])
    with pytest.raises(InvalidFileError) as err:
        producer.submit(path)
    lines = [str(e) for e in err.value.errors]
    assert [e.line for e in err.value.errors] == [3, 5, 6, 7]
    assert lines[0] == f"{path}:3: temperature: must be greater than or equal to 0 (got -1)"
    assert lines[1].startswith(f"{path}:5: <line>: invalid JSON: ")
    assert lines[2].startswith(f"{path}:6: messages.0.role: ")
    assert lines[3].startswith(f"{path}:7: max_tokens: {MAX_OUTPUT_TOKENS + 1} exceeds")
    assert err.value.error_count == 4
    # Nothing at all was written to Redis.
    assert rdb.llen("low") == 0 and rdb.llen("high") == 0
    assert rdb.dbsize() == 0


def test_empty_file_is_an_error(producer: Producer, write_jsonl: Callable[..., Path],
                                tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for path in (empty, write_jsonl(["", "  ", "\t"])):
        with pytest.raises(InvalidFileError, match="empty"):
            producer.submit(path, skip_invalid=True)


def test_duplicate_custom_id_names_both_lines(producer: Producer,
                                              write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl([
        {"prompt": "a", "custom_id": "x"},
        batch_line({"messages": USER_HI}, custom_id="y"),
        {"prompt": "b", "custom_id": "x"},
        batch_line({"messages": USER_HI}, custom_id="y"),
    ])
    with pytest.raises(InvalidFileError) as err:
        producer.submit(path)
    assert [str(e) for e in err.value.errors] == [
        f"{path}:3: custom_id: 'x' is also the custom_id of line 1",
        f"{path}:4: custom_id: 'y' is also the custom_id of line 2",
    ]


def test_custom_id_cannot_take_another_lines_job_id(producer: Producer,
                                                    write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl([{"prompt": "a"}, {"prompt": "b", "custom_id": "L1"}])
    with pytest.raises(InvalidFileError) as err:
        producer.submit(path)
    assert [str(e) for e in err.value.errors] == [
        f"{path}:2: custom_id: 'L1' is the job id of line 1, which has no custom_id"]


def test_skip_invalid_enqueues_the_good_lines(producer: Producer, rdb: redis.Redis,
                                              write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl([{"prompt": "a"}, {"prompt": ""}, "", {"prompt": "c"}, "[]"])
    report = producer.submit(path, skip_invalid=True)
    assert (report.accepted, report.new, report.skipped) == (2, 2, 2)
    assert [e.line for e in report.errors] == [2, 5]
    assert rdb.llen("low") == 2
    assert [r.line for r in producer.store.iter_jobs(report.batch_id)] == [1, 4]


def test_skip_invalid_with_no_valid_line_is_an_error(producer: Producer, rdb: redis.Redis,
                                                     write_jsonl: Callable[..., Path]) -> None:
    with pytest.raises(InvalidFileError):
        producer.submit(write_jsonl([{"prompt": ""}, "{"]), skip_invalid=True)
    assert rdb.dbsize() == 0


def test_error_list_is_capped_but_counted(producer: Producer,
                                          write_jsonl: Callable[..., Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("producer.client.MAX_KEPT_ERRORS", 5)
    with pytest.raises(InvalidFileError) as err:
        producer.submit(write_jsonl(["{"] * 12))
    assert len(err.value.errors) == 5 and err.value.error_count == 12
    assert "(and 11 more)" in str(err.value)


def test_encoding(parser: LineParser) -> None:
    # A byte order mark on the first line is fine; bytes that are not UTF-8 are an error.
    assert parser.parse(b'\xef\xbb\xbf{"prompt": "a"}\n', 1).prompt == "a"
    with pytest.raises(LineInvalid) as err:
        parser.parse(b'{"prompt": "\xff"}\n', 2)
    assert err.value.problems == [("<line>", "not UTF-8: invalid start byte")]


def test_deep_and_non_finite_lines_name_file_line_and_field(
        producer: Producer, rdb: redis.Redis, write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl([
        {"prompt": "ok"},
        '{"messages": ' + nested(100_000) + "}",
        '{"prompt": "a", "temperature": Infinity}',
        '{"prompt": "a", "temperature": NaN, "top_p": 1e400}',
        '{"custom_id": "r", "method": "POST", "url": "' + COMPLETIONS + '", "body": {"prompt":'
        ' "a", "temperature": 1e400, "top_k": ' + str(2**31) + "}}",
        {"prompt": "a", "temperature": 1e-7},
    ])
    with pytest.raises(InvalidFileError) as err:
        producer.submit(path)
    assert [str(e) for e in err.value.errors] == [
        f"{path}:2: messages: nests deeper than {MAX_JSON_DEPTH} levels",
        f"{path}:3: temperature: must be a finite number (got inf)",
        f"{path}:4: temperature: must be a finite number (got nan)",
        f"{path}:4: top_p: must be a finite number (got inf)",
        f"{path}:5: body.temperature: must be a finite number (got inf)",
        f"{path}:5: body.top_k: must be less than or equal to {TOP_K_MAX} (got {2**31})",
    ]
    assert rdb.dbsize() == 0


def test_file_level_error_has_no_line(producer: Producer, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InvalidFileError) as err:
        producer.submit(empty)
    assert [str(e) for e in err.value.errors] == [f"{empty}: empty file (no JSON lines)"]
