"""Text <-> token ids for the frontend, from a Hugging Face directory's tokenizer files.

Uses the `tokenizers` library and jinja2 directly: transformers' tokenizer classes import torch,
and the frontend stays torch-free so it starts fast and stays small."""
import functools
import json
from collections.abc import Callable
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Tokenizer
from tokenizers.decoders import DecodeStream

from splitfuse.config import SamplingParams, is_int


class Tokenizer:
    """With `max_model_len`, prompts the model cannot take are refused here, before a worker sees them,
    and a text too long to fit is refused before it is tokenized."""

    def __init__(self, model_dir: str | Path, max_model_len: int | None = None):
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise ValueError(f"{model_dir} has no tokenizer.json (a fast tokenizer is required)")
        self._tok = _Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = _read_json(model_dir / "tokenizer_config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        template_file = model_dir / "chat_template.jinja"
        self.chat_template: str | None = (template_file.read_text() if template_file.is_file()
                                          else config.get("chat_template"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.max_model_len = max_model_len
        # A token decodes to at most as many characters as its vocabulary entry has (one per byte or piece),
        # so a text longer than this cannot fit in max_model_len tokens.
        longest = max(map(len, self._tok.get_vocab(with_added_tokens=True)))
        self.max_chars = max_model_len * longest if max_model_len else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str) or not text:
            raise ValueError("prompt must be a non-empty string or a non-empty list of token ids")
        return self._encode(text, add_special_tokens)

    def encode_prompt(self, params: SamplingParams, *, prompt: str | None = None, messages: list | None = None,
                      prompt_ids: list[int] | None = None, tools: list[dict] | None = None) -> tuple[str, list[int]]:
        """(prompt text, prompt token ids) of a prompt given as text, chat messages or token ids. Refuses ids
        outside the vocabulary (stop_token_ids and logit_bias too) and prompts longer than the model takes. The text of
        prompt_ids is decoded only when return_full_text needs it."""
        if prompt_ids is None:
            text = prompt if messages is None else self.render_chat(messages, tools)
            # A chat template writes the special tokens itself, as transformers does.
            ids = self.encode(text) if messages is None else self._encode(text, add_special_tokens=False)
        else:
            text, ids = None, prompt_ids
        self._check_length(ids)
        self._check_ids(ids, "prompt token ids")
        self._check_ids(params.stop_token_ids, "stop_token_ids")
        self._check_ids(list(params.logit_bias), "logit_bias keys")
        if text is None:
            text = self.decode(ids) if params.return_full_text else ""
        return text, ids

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The chat template's text of `messages`, with the generation prompt; `tools` (OpenAI's function
        tools) are handed to it as transformers hands them."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        _check_messages(messages)
        self._check_chars(sum(len(m["content"]) for m in messages))  # before rendering, which copies them all
        return _compile(self.chat_template).render(messages=messages, tools=tools, add_generation_prompt=True,
                                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self._encode(self.render_chat(messages), add_special_tokens=False)

    def decode_stream(self, context: list[int]) -> Callable[[int], str | None]:
        """A text stream that continues `context`: called with each next token id, it returns the text that
        token completes (None while a multi-byte character is still incomplete)."""
        stream = DecodeStream(ids=context, skip_special_tokens=True)
        return functools.partial(stream.step, self._tok)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        self._check_chars(len(text))
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def _check_chars(self, n: int) -> None:
        if self.max_chars is not None and n > self.max_chars:
            raise ValueError(f"prompt has {n} characters; the model's maximum length is {self.max_model_len} "
                             f"tokens, which no text over {self.max_chars} characters fits: shorten it")

    def _check_length(self, ids: list[int]) -> None:
        if self.max_model_len is not None and len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's maximum length is {self.max_model_len}, "
                             f"so prompts can have at most {self.max_model_len - 1}")

    def _check_ids(self, ids: list[int], what: str) -> None:
        if not all(is_int(t, 0, self.vocab_size - 1) for t in ids):
            raise ValueError(f"{what} must be integers in [0, {self.vocab_size}), this model's vocabulary")


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs a string 'role' and 'content', got {m!r}")


@functools.lru_cache(maxsize=8)  # compiled once per template, not per chat
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def _raise(message: str):
    raise ValueError(f"chat template: {message}")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token
