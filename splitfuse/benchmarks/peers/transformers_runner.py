"""Hugging Face transformers as the static-batch baseline: `generate` on left-padded batches of
`hf_batch` prompts, each batch running until all its prompts have their tokens."""
from contextlib import contextmanager

import torch
import transformers

from splitfuse.benchmarks import hf_baseline
from splitfuse.benchmarks.peers import harness


@contextmanager
def open_engine(settings: dict):
    torch.set_num_threads(settings["threads"])
    model = hf_baseline.load(settings["model_dir"], settings["dtype"])
    pad_id = hf_baseline._pad_id(model)

    @torch.inference_mode()
    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        generated = []
        for batch in harness.chunks(prompts, settings["hf_batch"]):
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            generated += out[:, width:].tolist()
        return generated

    yield harness.Engine(generate, {
        "version": transformers.__version__,
        "how": f"generate(), static batches of {settings['hf_batch']}, left padding, {model.dtype}"})


if __name__ == "__main__":
    harness.main(open_engine)
