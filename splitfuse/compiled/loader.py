"""Load a Hugging Face checkpoint directory (safetensors, single file or sharded) into our models."""
import json
import mmap
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from splitfuse.compiled.bundled import BUNDLED_NAME, bundled_model_dir
from splitfuse.compiled.models.layers import Linear, Projections
from splitfuse.compiled.models.llama import LlamaForCausalLM
from splitfuse.compiled.models.opt import OPTForCausalLM
from splitfuse.compiled.parallel import SINGLE, Shard
from splitfuse.kernels import cpu

MODEL_CLASSES = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM,
                 "opt": OPTForCausalLM}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
HUGE_PAGE = 2 << 20  # the size of a transparent huge page on x86-64


def resolve_model_dir(model: str | None, cache_dir: str | None = None) -> Path:
    """`None` or the bundled name gives the bundled model; anything else must be a local HF directory."""
    if model is None or model.lower() == BUNDLED_NAME:
        return bundled_model_dir(cache_dir)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"model {model!r} is not a local Hugging Face directory with a config.json "
                         f"(models are never downloaded); use a local path or {BUNDLED_NAME!r}")
    return path


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/"auto": bf16 where the hardware computes it natively, else fp16 on GPU and fp32 on CPU.
    SPLITFUSE_AUTO_DTYPE names what "auto" means instead (`make test-bf16` runs the suite in bf16 on a CPU
    that computes fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto") and os.environ.get("SPLITFUSE_AUTO_DTYPE", "auto") != "auto":
        dtype = os.environ["SPLITFUSE_AUTO_DTYPE"]
    if dtype in (None, "auto"):
        if device.type == "cuda":
            # Native only: GPUs before Ampere emulate bf16, which the Triton kernel's tl.dot cannot use.
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def load_config(model_dir: Path):
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in MODEL_CLASSES:
        raise ValueError(f"unsupported architecture {config.model_type!r}; supported: {sorted(MODEL_CLASSES)}")
    return config


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device, shard: Shard = SINGLE) -> nn.Module:
    """The model, or with a tensor-parallel shard this rank's part of it, reading only that part's bytes."""
    config = load_config(model_dir)
    with torch.device("meta"):
        model = MODEL_CLASSES[config.model_type](config, shard)
    # Parameters the model ties to an earlier one, by name (lm_head.weight -> its embed_tokens.weight).
    tied: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    aliases = {alias: names[0] for names in tied.values() for alias in names[1:]}
    state = {name: t.to(dtype) for name, t in _read_safetensors(model_dir, _slices(model)).items()
             if not name.endswith("rotary_emb.inv_freq")}
    for alias, name in aliases.items():
        state.setdefault(alias, state[name])  # checkpoints of tied models usually store only the first
    model.load_state_dict(state, strict=True, assign=True)
    # assign=True makes a Parameter per name: tied ones would become two, and .to(device) would copy
    # each. Make every alias the same Parameter again.
    for alias, name in aliases.items():
        module, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(module), attr, model.get_parameter(name))
    # Only non-persistent buffers (rotary tables) are still fp32 here; they stay fp32.
    model = model.to(device).eval().requires_grad_(False)
    if device.type == "cpu":
        cpu.library()  # built and loaded before a step is traced: tracing then only reads the result
    for kind in (Linear, Projections):  # projections put their members' packs side by side
        for module in model.modules():
            if isinstance(module, kind):
                module.pack_for_cpu()
    _packs_to_huge_pages(model)
    return model


def _packs_to_huge_pages(model: nn.Module) -> None:
    """The packed weights moved into one private mapping that the kernel may back with 2 MB pages
    (transparent huge pages, where they are enabled as "madvise" or "always"). A 1-token step reads every
    weight once: for the bundled model 269 MB, 66k pages of 4 KB whose translations miss the TLB. With them,
    single stream ran 1.13-1.42x faster per request in four alternating pairs (AVX-512 BF16 Zen 4, bf16).
    The KV cache in such memory too made no difference that the offline workload could tell."""
    modules = [m for m in model.modules() if getattr(m, "packed", None) is not None]
    if not modules:
        return
    sizes = [-(-m.packed.nbytes // 64) * 64 for m in modules]  # each pack 64-byte aligned, as the allocator's
    flat = anonymous_memory(sum(sizes) + HUGE_PAGE, huge_pages=True)
    offset = -flat.data_ptr() % HUGE_PAGE  # only whole, aligned 2 MB spans can be huge pages
    for module, size in zip(modules, sizes):
        packed = module.packed
        module.packed = flat[offset:offset + packed.nbytes].view(packed.dtype).view(packed.shape).copy_(packed)
        offset += size


def anonymous_memory(nbytes: int, huge_pages: bool = False) -> torch.Tensor:
    """nbytes of a private anonymous mapping as a uint8 tensor, which keeps the mapping alive as long as a view of
    it is: zeros that the kernel fills in a page at a time where they are first touched. `huge_pages`: advised
    for transparent huge pages (Linux)."""
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=torch.uint8)


def _slices(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Parameter name -> (dim, start, length) of the checkpoint tensor a sharded layer holds (models/sharded.py)."""
    slices = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, (dim, start) in getattr(module, "shards", {}).items():
            param = getattr(module, name)
            if param is not None:
                slices[f"{prefix}.{name}"] = (dim, start, param.shape[dim])
    return slices


def _read(file, name: str, part: tuple[int, int, int] | None) -> torch.Tensor:
    """A tensor, or its slice [start, start + length) along dim, zero-padded past the tensor's end."""
    if part is None:
        return file.get_tensor(name)
    dim, start, length = part
    view = file.get_slice(name)
    index = (slice(None),) * dim + (slice(start, start + length),)
    t = view[index]
    if t.shape[dim] < length:  # the last rank's share of a vocabulary that does not divide evenly
        pad = list(t.shape)
        pad[dim] = length - t.shape[dim]
        t = torch.cat([t, t.new_zeros(pad)], dim)
    return t


def _read_safetensors(model_dir: Path, slices: dict[str, tuple[int, int, int]]) -> dict[str, torch.Tensor]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(model_dir / name, framework="pt") as f:
            state.update({key: _read(f, key, slices.get(key)) for key in f.keys()})
    return state
