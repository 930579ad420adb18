"""The C++ CPU kernels (cpu_kernels.cpp): built once per machine with the system C++ compiler (the one
torch.compile's CPU backend uses too), cached by source hash, and called through ctypes.

If no compiler is found the torch reference serves instead, with one warning."""
import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from splitfuse.config import cache_root

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failed = False


_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def _build() -> Path:
    source = _SOURCE.read_bytes()
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS]).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"cpu_kernels-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: replicas starting together never load half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be built here."""
    global _library, _failed
    with _lock:
        if _library is None and not _failed:
            try:
                lib = ctypes.CDLL(str(_build()))
            except (OSError, subprocess.CalledProcessError) as e:
                _failed = True
                detail = getattr(e, "stderr", "") or str(e)
                print(f"splitfuse: CPU kernels unavailable, using the slower torch reference: {detail}",
                      file=sys.stderr)
                return None
            for suffix in _SUFFIX.values():
                getattr(lib, f"splitfuse_store_kv_{suffix}").argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2
                getattr(lib, f"splitfuse_attention_{suffix}").argtypes = (
                    [ctypes.c_void_p] * 6 + [ctypes.c_int] * 7 + [ctypes.c_float, ctypes.c_int, ctypes.c_void_p])
                getattr(lib, f"splitfuse_linear_{suffix}").argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
            _library = lib
    return _library


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the C++ kernels take these: one supported dtype, contiguous, a head size that is a
    multiple of 8 (their vector width), and a library built here."""
    dtype = tensors[0].dtype
    return (dtype in _SUFFIX and tensors[0].shape[-1] % 8 == 0
            and all(t.dtype == dtype and t.is_contiguous() for t in tensors) and library() is not None)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    slots = slot_mapping.to(torch.int32).contiguous()  # the runner's int32: no copy per layer
    fn = getattr(library(), f"splitfuse_store_kv_{_SUFFIX[key.dtype]}")
    fn(key.data_ptr(), value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
       key.shape[0], key[0].numel())


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                    sliding_window: int) -> torch.Tensor:
    out = torch.empty_like(q)
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    starts = query_start_loc.to(torch.int32).contiguous()
    fn = getattr(library(), f"splitfuse_attention_{_SUFFIX[q.dtype]}")
    fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), starts.data_ptr(),
       lens.shape[0], q.shape[0], q.shape[1], k_cache.shape[2], q.shape[2], k_cache.shape[1], tables.shape[1],
       scale, sliding_window, out.data_ptr())
    return out


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                  gated: bool = False) -> torch.Tensor:
    """See reference.packed_linear (gated: reference.packed_gated_linear); x fp32 and contiguous."""
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    bias = None if bias is None else bias.float().contiguous()
    fn = getattr(library(), f"splitfuse_linear_{_SUFFIX[packed.dtype]}")
    fn(x.data_ptr(), packed.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
       x.shape[0], out_features, x.shape[1], gated)
    return out
