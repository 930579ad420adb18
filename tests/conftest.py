"""Shared fixtures: tiny random-weight checkpoints of each supported family, built with transformers; a worker
loop on an in-process link."""
import os
import threading
import time

import pytest
import torch
import transformers
import zmq

# Triton chooses interpreter or compiler from TRITON_INTERPRET as it decorates kernels, its own tl.*
# helpers included when triton is first imported, so the choice holds for the whole process. Without
# a GPU the kernels can only run interpreted; with one nothing is (kernel tests run on the GPU, and
# CUDA graphs capture compiled kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    import numpy as np
    from triton.runtime import interpreter

    # Interpreted, tl.dot is numpy's matmul, whose BLAS gives a row other bits at another place in the tile where
    # OpenBLAS runs its AVX2 kernels (on AVX2 CPUs, and on a Zen 5, which OpenBLAS 0.3.31 named Haswell): the tests
    # of batch invariance would see the batch change a row's bits, as no GPU's matrix units do. einsum sums every
    # output over k in one order, wherever its row lies. (Only the dots the kernels here make: no fp8 operands.)
    def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        product = np.einsum("...ik,...kj->...ij", a.data, b.data, dtype=d.data.dtype)
        return interpreter.TensorHandle(product + d.data, d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = _create_dot

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(
        **TINY, num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}),
    "mistral": lambda: transformers.MistralConfig(**TINY, num_key_value_heads=1, intermediate_size=96,
                                                  sliding_window=8, head_dim=16),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, num_key_value_heads=2, intermediate_size=96),
    "opt": lambda: transformers.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          ffn_dim=96, max_position_embeddings=256, word_embed_proj_dim=32),
}


def build_checkpoint(family: str, path) -> "transformers.PreTrainedModel":
    """Save a seeded random model of `family` to `path` and return the transformers model (fp32, eager)."""
    torch.manual_seed(0)
    config = FAMILIES[family]()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def tiny_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, build_checkpoint(request.param, path)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """`make_checkpoint(family)` -> directory of a tiny random checkpoint (built once per family)."""
    built: dict[str, object] = {}

    def make(family: str):
        if family not in built:
            built[family] = tmp_path_factory.mktemp(family)
            build_checkpoint(family, built[family])
        return built[family]
    return make


@pytest.fixture
def worker_link():
    """`worker_link(engine)` -> (the frontend's socket, the worker's identity on it): the engine's worker loop in a
    thread behind an in-process link, its first heartbeat read. Stopped at the end of the test."""
    from splitfuse import protocol
    from splitfuse.worker.main import Worker
    context, running = zmq.Context(), []

    def start(engine):
        frontend, link = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
        frontend.bind("inproc://worker")
        link.connect("inproc://worker")
        worker = Worker(engine, link, 0)
        thread = threading.Thread(target=worker.run)
        thread.start()
        running.append((worker, thread, frontend))
        assert frontend.poll(30_000)
        identity, frame = frontend.recv_multipart()  # its first heartbeat (main() says ready before run())
        assert isinstance(protocol.decode(frame, protocol.WORKER_REPLIES), protocol.Heartbeat)
        return frontend, identity

    yield start
    for worker, thread, frontend in running:
        worker.running = False
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            if frontend.poll(100):  # what the test left unread can hold up the worker's next send
                frontend.recv_multipart()
        thread.join(1)
    context.destroy(linger=0)
