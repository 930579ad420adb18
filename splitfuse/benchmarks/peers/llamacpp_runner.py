"""llama.cpp through llama-cpp-python's low-level API (the high-level `Llama` runs one sequence).

One context holds every sequence of a batch, each in its own KV stream (`kv_unified` off, so a
token attends over its own sequence only). generate() feeds each prompt in `n_batch`-token
`llama_decode` calls, then decodes every sequence's next token in one call per step; greedy is an
argmax over the returned logits."""
import sys
from contextlib import contextmanager
from importlib.metadata import version

import harness
import llama_cpp
import numpy as np

N_BATCH = 512
KV_TYPES = {"fp32": llama_cpp.GGML_TYPE_F32, "bf16": 30}  # 30: ggml.h's GGML_TYPE_BF16
LOGGED_LEVELS = (3, 4)  # ggml.h: WARN, ERROR (INFO and DEBUG describe every graph)


@llama_cpp.llama_log_callback
def log(level: int, text: bytes, user_data) -> None:
    if level in LOGGED_LEVELS:
        sys.stderr.write(text.decode(errors="replace"))


@contextmanager
def open_engine(settings: dict):
    llama_cpp.llama_log_set(log, None)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(settings["gguf"].encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {settings['gguf']}")
    params = llama_cpp.llama_context_default_params()
    params.n_seq_max = settings["max_batch"]
    params.kv_unified = False
    params.n_ctx = settings["max_batch"] * -(-settings["max_seq_len"] // 256) * 256  # n_ctx / n_seq_max per stream
    params.n_batch = params.n_ubatch = N_BATCH
    params.n_threads = params.n_threads_batch = settings["threads"]
    params.type_k = params.type_v = KV_TYPES[settings["dtype"]]
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError("llama.cpp could not create its context")
    memory = llama_cpp.llama_get_memory(ctx)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)

    def decode_chunk(entries: list[tuple[int, int, int, bool]]) -> list[int]:
        for i, (seq, pos, token, wanted) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.logits[i] = token, pos, wanted
            batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
        batch.n_tokens = len(entries)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return [int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())
                for i, entry in enumerate(entries) if entry[3]]

    def decode(entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """entries: (sequence, position, token, wants logits); the argmax at each wanted position."""
        return [t for chunk in harness.chunks(entries, N_BATCH) for t in decode_chunk(chunk)]

    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        llama_cpp.llama_memory_clear(memory, True)
        # One prompt per call: with a KV stream per sequence, llama.cpp cuts a batch that mixes
        # sequences into pieces holding as many tokens of each, i.e. many small ones.
        generated = [decode([(seq, pos, token, pos == len(prompt) - 1) for pos, token in enumerate(prompt)])
                     for seq, prompt in enumerate(prompts)]
        for step in range(max_new_tokens - 1):
            tokens = decode([(seq, len(prompt) + step, out[-1], True)
                             for seq, (prompt, out) in enumerate(zip(prompts, generated))])
            for out, token in zip(generated, tokens):
                out.append(token)
        return generated

    try:
        yield harness.Engine(generate, {
            "version": version("llama_cpp_python"),
            "how": f"llama_decode: each prompt {N_BATCH} tokens a call, then all sequences decoded together; "
                   f"one KV stream per sequence, {settings['dtype']} GGUF and KV"})
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    harness.main(open_engine)
