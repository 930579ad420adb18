"""The benchmark's workloads: FastGen's presets scaled to a CPU, drawn from a fixed corpus, seeded.

Prompt and generation lengths ~ Normal(mean, 0.3 x mean) (FastGen's setting), redrawn until they
lie in [1, 2 x mean]; the means are FastGen's multiplied by FASTGEN_SCALE so that a sweep takes
minutes, not hours, on 2 CPU cores. Prompts are windows of token ids cut at seeded offsets from
a fixed corpus of generated English-like text (nothing is downloaded). Every backend gets the
same requests; requests run with ignore_eos and max_new_tokens = the drawn generation length, so
every backend generates exactly the same number of tokens."""
import random
from dataclasses import dataclass
from pathlib import Path

from splitfuse.frontend.tokenizer import Tokenizer

FASTGEN_SCALE = 0.25  # prompt and generation lengths of FastGen's workloads, scaled for a 2-core CPU
LENGTH_CV = 0.3       # standard deviation as a fraction of the mean (FastGen's setting)


@dataclass(frozen=True, slots=True)
class Preset:
    """A FastGen workload (mean prompt / generation tokens), scaled by FASTGEN_SCALE."""
    name: str
    fastgen_prompt: int
    fastgen_gen: int

    @property
    def prompt_mean(self) -> int:
        return round(self.fastgen_prompt * FASTGEN_SCALE)

    @property
    def gen_mean(self) -> int:
        return round(self.fastgen_gen * FASTGEN_SCALE)

    def describe(self) -> str:
        return (f"{self.name}: prompt {self.prompt_mean} / generation {self.gen_mean} tokens "
                f"(FastGen {self.fastgen_prompt}/{self.fastgen_gen} x {FASTGEN_SCALE})")


PRESETS = {p.name: p for p in (
    Preset("p2600-g128", 2600, 128),  # long prompt, short generation
    Preset("p1200-g60", 1200, 60),    # long prompt, short generation
    Preset("p128-g128", 128, 128),    # chat-like: short prompt, as long a generation
)}


@dataclass(frozen=True, slots=True)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int


_WORDS = ("the of and to in is was that for on with as by at from it an be this which or are have not had "
          "one all were when there can more if out so up said what about than into them only time two may "
          "first new some could these over such after most made also did many before must through back "
          "years where much your way well down should because each just those people how too little state "
          "good very make world still own see men work long get here between both life being under never "
          "day same another know while last might great old year off come since against go came right used "
          "take three place small found house river mountain engine kernel memory token model server "
          "request batch prompt cache block budget latency throughput scheduler thread process water city "
          "history music garden winter summer morning evening letter question answer number system").split()


def corpus_text(words: int = 20_000, seed: int = 0) -> str:
    """Deterministic English-like text (sentences of common words): a fixed corpus with no download."""
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < words:
        n = rng.randint(6, 18)
        sentence = " ".join(rng.choice(_WORDS) for _ in range(n))
        sentences.append(sentence[0].upper() + sentence[1:] + rng.choice((".", ".", ".", "?", "!")))
        count += n
    return " ".join(sentences)


def corpus_ids(model_dir: str | Path) -> list[int]:
    """The corpus as the model's token ids (with the frontend's tokenizer, which needs no torch)."""
    return Tokenizer(model_dir).encode(corpus_text())


def draw_length(rng: random.Random, mean: int) -> int:
    """Normal(mean, LENGTH_CV x mean), redrawn until it lies in [1, 2 x mean]."""
    while True:
        n = round(rng.gauss(mean, LENGTH_CV * mean))
        if 1 <= n <= 2 * mean:
            return n


def make_workload(preset: Preset, count: int, corpus: list[int], seed: int = 0) -> list[Request]:
    """`count` requests; the first k are the same for any count >= k, so sweeps share a prefix."""
    rng = random.Random(f"{preset.name}-{seed}")
    requests = []
    for _ in range(count):
        prompt_len = draw_length(rng, preset.prompt_mean)
        if prompt_len > len(corpus):
            raise ValueError(f"the corpus ({len(corpus)} tokens) is shorter than a {prompt_len}-token prompt")
        start = rng.randrange(len(corpus) - prompt_len + 1)
        requests.append(Request(corpus[start:start + prompt_len], draw_length(rng, preset.gen_mean)))
    return requests
