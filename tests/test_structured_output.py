"""Structured output and logit_bias, through the OpenAI client and the ZeroMQ client, on the bundled model.
The oracles are independent of the engine: pydantic validates the JSON, `re.fullmatch` the regex, the
choice list its answers."""
import asyncio
import re
from typing import Annotated, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.config import SamplingParams
from splitfuse.frontend.client import AsyncClient
from splitfuse.frontend.serve import serve
from splitfuse.grammar import _grammar_of, grammar
from splitfuse.worker.grammars import Grammars

ENGINE = dict(device="cpu", dtype="float32", eager=True, num_blocks=512, max_model_len=1024)
MODEL = "smollm2-135m-instruct"
PROMPTS = [f"Describe {who} in JSON." for who in
           ("a cat", "a city", "a car", "a teacher", "a river", "a song", "a tree", "a planet", "a chef", "a book",
            "a bridge", "a storm", "a robot", "a garden", "a painter", "a train", "a museum", "a desert", "a ship",
            "a forest")]


class Address(BaseModel):
    city: str = Field(max_length=24)
    floor: int = Field(ge=0, le=99)


class Person(BaseModel):  # nested objects
    name: str = Field(max_length=24)
    address: Address


class Shopping(BaseModel):  # arrays
    items: list[Annotated[str, Field(max_length=16)]] = Field(min_length=1, max_length=3)
    counts: list[Annotated[int, Field(ge=0, le=999)]] = Field(max_length=3)


class Weather(BaseModel):  # enums
    sky: Literal["clear", "cloudy", "rain"]
    wind: Literal["calm", "breezy", "stormy"]


@pytest.fixture(scope="module")
def server():
    with serve(http_port=0, **ENGINE) as deployment:
        yield deployment


def run(server, ask):
    """Runs `ask(api)` with an OpenAI client of the server, closed before the loop ends."""
    async def with_client():
        async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="none", timeout=300) as api:
            return await ask(api)
    return asyncio.run(with_client())


@pytest.mark.parametrize("schema", [Person, Shopping, Weather])
def test_parse_returns_objects_that_validate(server, schema):
    """openai's `parse` sends the pydantic model's strict JSON Schema and validates the answer against it."""
    async def ask(api):
        return await asyncio.gather(*(api.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": prompt}], response_format=schema, max_tokens=200,
            temperature=0.7, seed=1) for prompt in PROMPTS))
    choices = [answer.choices[0] for answer in run(server, ask)]
    assert [c.finish_reason for c in choices] == ["stop"] * len(PROMPTS)
    assert all(isinstance(c.message.parsed, schema) for c in choices)


def test_regex_and_choice_always_match_with_every_sampling_mode(server):
    modes = [dict(temperature=0), dict(temperature=1.0, seed=3), dict(temperature=1.5, top_p=0.9, seed=4),
             dict(temperature=1.0, seed=5, extra_body={"top_k": 5, "min_p": 0.05})]
    constraints = [{"guided_regex": r"\d{3}-\d{4}"}, {"structured_outputs": {"choice": ["red", "green", "blue"]}}]

    async def ask(api):
        answers = await asyncio.gather(*(api.completions.create(
            model=MODEL, prompt="My phone number is", max_tokens=20, n=5,
            **{k: v for k, v in mode.items() if k != "extra_body"}, extra_body=constraint | mode.get("extra_body", {}))
            for mode in modes for constraint in constraints))
        return [[(c.text, c.finish_reason) for c in answer.choices] for answer in answers]
    answers = run(server, ask)
    for phones, colours in zip(answers[::2], answers[1::2]):
        assert all(re.fullmatch(r"\d{3}-\d{4}", text) and end == "stop" for text, end in phones), phones
        assert all(text in ("red", "green", "blue") and end == "stop" for text, end in colours), colours


def test_a_grammar_that_cannot_finish_ends_with_length(server):
    answer = run(server, lambda api: api.completions.create(model=MODEL, prompt="Digits:", max_tokens=6, temperature=0,
                                                            extra_body={"guided_regex": r"[0-9]{40}"}))
    assert answer.choices[0].finish_reason == "length"
    assert re.fullmatch(r"[0-9]{6}", answer.choices[0].text)


def test_a_bad_constraint_is_a_400_naming_it_and_others_go_on(server):
    async def ask(api):
        good = asyncio.create_task(api.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0))
        bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
        for extra, words in (({"guided_regex": "(("}, "unclosed group"), ({"response_format": bad_schema}, "nope"),
                             ({"guided_grammar": "start: undefined_rule"}, "undefined_rule"),
                             ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.json_schema"),
                             ({"guided_regex": "a", "guided_choice": ["b"]}, "one constraint")):
            with pytest.raises(openai.BadRequestError, match=re.escape(words)):
                await api.completions.create(model=MODEL, prompt="Hi", max_tokens=4, extra_body=extra)
        return await good
    assert run(server, ask).choices[0].finish_reason == "length"


def _past_the_parser_limits(rules: int) -> str:
    """A valid Lark grammar (its shortest text is "a") whose Earley parse outgrows llguidance's limits: with 2000
    rules while the first mask is computed, with 1000 at the first token."""
    return "start: r0\n" + "\n".join(f'r{i}: r{i + 1} r{i + 1} | "a"' for i in range(rules)) + f'\nr{rules}: "b"'


@pytest.mark.parametrize("rules", [2000, 1000])
def test_a_grammar_past_the_parsers_limits_is_a_short_400_not_a_match(server, rules):
    """Such a grammar passes the frontend's check and fails in the worker. Before, the first mask's failure left
    only EOS allowed, and the request ended "stop" with an empty text that the grammar does not match; the later
    failure was a 500 whose 25 KB message printed the parser's state and the whole grammar."""
    extra = {"guided_grammar": _past_the_parser_limits(rules)}

    async def ask(api):
        with pytest.raises(openai.BadRequestError) as refused:
            await api.completions.create(model=MODEL, prompt="Write:", max_tokens=4, temperature=0, extra_body=extra)
        stream = await api.completions.create(model=MODEL, prompt="Write:", max_tokens=4, temperature=0, stream=True,
                                              extra_body=extra)
        with pytest.raises(openai.APIError) as streamed:
            async for _ in stream:
                pass
        after = await api.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
        return refused.value, streamed.value, after
    refused, streamed, after = run(server, ask)
    for error in (refused, streamed):
        assert "structured output: " in error.message and len(error.message) < 400, error.message
    assert refused.status_code == 400 and streamed.type == "invalid_request_error"
    assert after.choices[0].finish_reason == "length"


def test_a_constraint_is_compiled_once_for_all_the_choices_of_a_request():
    schema = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "string"}}}
    before = _grammar_of.cache_info()
    params = [SamplingParams(max_new_tokens=4, seed=7 + choice, structured={"json": schema}) for choice in range(8)]
    after = _grammar_of.cache_info()
    assert after.misses - before.misses <= 1 and after.hits - before.hits >= 7
    # keyed in the schema's own order: its properties are generated in that order
    reordered = {"type": "object", "properties": {"a": {"type": "string"}, "z": {"type": "integer"}}}
    assert grammar({"json": reordered}) != grammar({"json": schema})


def test_logit_bias_moves_the_greedy_choice(server):
    def greedy(**extra):
        return lambda api: api.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1,
                                                  temperature=0, **extra)
    plain = run(server, greedy()).choices[0].text
    forced = run(server, greedy(logit_bias={"28": 100})).choices[0].text  # token 28 is ','
    assert forced == "," and plain != ","
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        run(server, greedy(logit_bias={"10000000": 1}))


def test_the_zeromq_protocol_takes_the_same_constraint(server):
    async def ask():
        async with AsyncClient(server.address) as api:
            return await api.complete("Pick a colour:", max_new_tokens=10, structured={"choice": ["cyan", "magenta"]})
    assert asyncio.run(ask()).generated_text in ("cyan", "magenta")


@pytest.mark.parametrize("constraint, words", [({"json": {"type": "nope"}}, "nope"), ({"regex": "(("}, "unclosed"),
                                               ({"choice": []}, "choice"), ({"json": {}, "regex": "a"}, "one of"),
                                               ({"grammar": 'root ::= "a'}, "grammar")])
def test_bad_constraints_are_refused_before_any_worker(constraint, words):
    with pytest.raises(ValueError, match=words):
        grammar(constraint)
    with pytest.raises(ValueError, match=words):
        SamplingParams(structured=constraint)


def test_a_worker_compiles_schemas_that_differ_in_property_order_apart():
    """Its cache of compiled grammars is keyed in the schema's own order (it was sorted: the second of two such
    schemas was generated in the first one's order)."""
    grammars = Grammars(bundled_model_dir(), 49152, [2])
    first = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "string"}}, "required": ["z", "a"]}
    second = {"type": "object", "properties": {"a": {"type": "string"}, "z": {"type": "integer"}}, "required": ["a", "z"]}
    grammars.start("first", {"json": first})
    grammars.start("second", {"json": second})
    assert len(grammars._compiled) == 2
