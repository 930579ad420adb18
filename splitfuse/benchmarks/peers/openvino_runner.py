"""OpenVINO GenAI: one ContinuousBatchingPipeline (default scheduler) over the exported model serves
both the offline batch and the single stream; weights are exported in fp32 and run at the
workload's precision through the CPU plugin's hints (its KV cache too, which defaults to u8)."""
from contextlib import contextmanager
from importlib.metadata import version

import harness
import numpy as np
import openvino as ov
import openvino_genai as ov_genai

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


@contextmanager
def open_engine(settings: dict):
    precision = PRECISIONS[settings["dtype"]]
    pipe = ov_genai.ContinuousBatchingPipeline(settings["openvino_dir"], ov_genai.SchedulerConfig(), "CPU",
                                               {"INFERENCE_PRECISION_HINT": precision, "KV_CACHE_PRECISION": precision})

    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        config = ov_genai.GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True, do_sample=False)
        results = pipe.generate([ov.Tensor(np.array([p], dtype=np.int64)) for p in prompts], [config] * len(prompts))
        return [list(r.m_generation_ids[0]) for r in results]

    yield harness.Engine(generate, {
        "version": version("openvino-genai"),
        "how": f"ContinuousBatchingPipeline, default SchedulerConfig, {precision} inference and KV cache"})


if __name__ == "__main__":
    harness.main(open_engine)
