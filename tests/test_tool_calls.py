"""Tool calling through the `openai` client on the bundled model: tool_choice "required" and a named function
are enforced by the grammar, so the arguments always parse and validate (pydantic is the oracle); a round
trip (call, tool message, answer), streamed and not; and the two formats' parsers on written examples."""
import json

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from splitfuse.frontend.serve import serve
from splitfuse.frontend.tools import ToolFormat
from splitfuse.frontend.pipeline import pipeline

MODEL = "smollm2-135m-instruct"
ENGINE = dict(device="cpu", dtype="float32", eager=True, num_blocks=512, max_model_len=1024)
QUESTIONS = ["What is the weather in Paris?", "Is it raining in Oslo?", "How warm is Lima today?",
             "Weather for Tokyo, please.", "Should I take an umbrella in London?"]


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=24)
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


class Sum(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: int = Field(ge=0, le=1000)
    b: int = Field(ge=0, le=1000)


TOOLS = [{"type": "function", "function": {"name": name, "description": text, "parameters": model.model_json_schema()}}
         for name, text, model in (("get_weather", "The weather of a city", Weather), ("add", "a + b", Sum))]
ARGUMENTS = {"get_weather": Weather, "add": Sum}


@pytest.fixture(scope="module")
def api():
    with serve(http_port=0, zmq=False, **ENGINE) as deployment:
        with openai.OpenAI(base_url=deployment.http_url + "/v1", api_key="none", max_retries=0) as client:
            yield client


def ask(api, messages, **options):
    return api.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, **({"max_tokens": 80} | options))


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_calls_always_parse_and_validate(api, tool_choice):
    for i, question in enumerate(QUESTIONS):
        answer = ask(api, [{"role": "user", "content": question}], tool_choice=tool_choice, temperature=0.8, seed=i)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        if isinstance(tool_choice, dict):
            assert call.function.name == "add"
        ARGUMENTS[call.function.name].model_validate_json(call.function.arguments)


def test_a_round_trip_streamed_and_not(api):
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    whole = ask(api, messages, tool_choice="required", temperature=0).choices[0].message
    call = whole.tool_calls[0]
    ARGUMENTS[call.function.name].model_validate_json(call.function.arguments)
    chunks = list(ask(api, messages, tool_choice="required", temperature=0, stream=True))
    streamed = [tc for chunk in chunks if chunk.choices for tc in chunk.choices[0].delta.tool_calls or []]
    assert "".join(tc.function.arguments or "" for tc in streamed) == call.function.arguments
    assert streamed[0].function.name == call.function.name and streamed[0].id
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    followed = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                           {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    answer = ask(api, followed, temperature=0, max_tokens=12).choices[0]
    assert answer.message.content and answer.finish_reason in ("stop", "length")


def test_no_tool_choice_answers_in_text_and_bad_choices_are_400(api):
    answer = ask(api, [{"role": "user", "content": "Say hello."}], tool_choice="none", max_tokens=8).choices[0]
    assert answer.message.tool_calls is None and answer.message.content
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        ask(api, [{"role": "user", "content": "Hi"}], tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="no tools"):
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="one constraint"):
        ask(api, [{"role": "user", "content": "Hi"}], tool_choice="required", response_format={"type": "json_object"})


def test_the_llama3_json_format_is_enforced_and_read_back():
    """The other format's grammar, on the engine through pipeline(): what it lets the model write parses."""
    llama3 = ToolFormat("llama3_json")
    with pipeline(**ENGINE) as pipe:
        answers = pipe.chat([[{"role": "user", "content": q}] for q in QUESTIONS], max_new_tokens=80,
                            do_sample=True, seed=7, structured=llama3.constraint(TOOLS))
    for answer in answers:
        content, calls = llama3.parse(answer.generated_text)
        assert answer.finish_reason == "stop" and content == "" and len(calls) == 1
        ARGUMENTS[calls[0].name].model_validate_json(calls[0].arguments)


@pytest.mark.parametrize("name, text, content, calls", [
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
     "Let me look.", [("add", {"a": 1, "b": 2})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n<tool_call>{"name": "g", "arguments": '
               '{"x": "y"}}</tool_call>', "", [("f", {}), ("g", {"x": "y"})]),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1', '<tool_call>\n{"name": "add", "arguments": {"a": 1',
     []),  # cut off: not a call, the text is kept
    ("hermes", "No tools needed.", "No tools needed.", []),
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', "", [("add", {"a": 1, "b": 2})]),
    ("llama3_json", '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"q": 1}}', "",
     [("f", {}), ("g", {"q": 1})]),
    ("llama3_json", "Plain words {not json}", "Plain words {not json}", []),
])
def test_parsers_read_calls_as_the_families_write_them(name, text, content, calls):
    got_content, got = ToolFormat(name).parse(text)
    assert got_content == content and [(c.name, json.loads(c.arguments)) for c in got] == calls


def test_streaming_holds_back_only_what_may_begin_a_call():
    hermes, llama3 = ToolFormat("hermes"), ToolFormat("llama3_json")
    assert hermes.streamable("Sure, here it is") == len("Sure, here it is")
    assert hermes.streamable("Sure <tool") == len("Sure ")
    assert hermes.streamable("Sure <tool_call>{") == len("Sure ")
    assert llama3.streamable("  {") == 0 and llama3.streamable("Hello") == len("Hello")
