"""The peers' workload: prompts of random token ids, one file that every system reads.

Random ids need no tokenizer on the peers' side and give no system a shared prefix to cache. They
are drawn from the ordinary vocabulary (no added/special tokens: no EOS, no chat markers)."""
import json
import random
from pathlib import Path

PROMPT_MEAN, PROMPT_STD = 384, 115
PROMPT_MIN, PROMPT_MAX = 16, 1000
OFFLINE_REQUESTS, QUICK_OFFLINE_REQUESTS = 48, 8
OFFLINE_NEW_TOKENS = 48
SINGLE_PROMPT, SINGLE_NEW_TOKENS = 32, 64
SINGLE_REPEATS, QUICK_SINGLE_REPEATS = 3, 1  # each with its own prompt, so no prefix cache helps
PROBE_PROMPT = 8                              # the first request, answered with one token: "ready"
# Warm-up: a few full-size prompts, and as many requests in all as the offline batch (the rest
# short), so that engines which compile or allocate per shape have seen the batch's shapes.
WARMUP_LONG, WARMUP_NEW_TOKENS = 4, 4


def ordinary_ids(model_dir: Path) -> list[int]:
    config = json.loads((model_dir / "config.json").read_text())
    added = json.loads((model_dir / "tokenizer.json").read_text()).get("added_tokens", [])
    special = {t["id"] for t in added} | {config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return [i for i in range(config["vocab_size"]) if i not in special]


def prompt_lengths(rng: random.Random, count: int) -> list[int]:
    """Normal(PROMPT_MEAN, PROMPT_STD), rounded and clipped to [PROMPT_MIN, PROMPT_MAX]."""
    return [min(max(round(rng.gauss(PROMPT_MEAN, PROMPT_STD)), PROMPT_MIN), PROMPT_MAX) for _ in range(count)]


def build(model_dir: Path, quick: bool = False, seed: int = 0) -> dict:
    """The token ids and lengths of every phase (see harness.measure); the driver adds "settings"."""
    rng = random.Random(seed)
    vocab = ordinary_ids(model_dir)

    def prompts(lengths: list[int]) -> list[list[int]]:
        return [rng.choices(vocab, k=n) for n in lengths]

    offline = prompts(prompt_lengths(rng, QUICK_OFFLINE_REQUESTS if quick else OFFLINE_REQUESTS))
    warmup = prompt_lengths(rng, WARMUP_LONG) + [PROMPT_MIN] * max(len(offline) - WARMUP_LONG, 0)
    return {"probe": prompts([PROBE_PROMPT])[0], "warmup": prompts(warmup), "warmup_new_tokens": WARMUP_NEW_TOKENS,
            "single": prompts([SINGLE_PROMPT] * (QUICK_SINGLE_REPEATS if quick else SINGLE_REPEATS)),
            "single_new_tokens": SINGLE_NEW_TOKENS,
            "offline": offline, "offline_new_tokens": OFFLINE_NEW_TOKENS}


def max_sequence_length() -> int:
    return PROMPT_MAX + max(OFFLINE_NEW_TOKENS, SINGLE_NEW_TOKENS, WARMUP_NEW_TOKENS)
