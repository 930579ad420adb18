"""The C++ CPU kernels (cpu_kernels.cpp): built once per machine with the system C++ compiler (the one
torch.compile's CPU backend uses too) against torch's headers, cached by source, compiler and torch
version, and loaded as the torch operators splitfuse_cpu::* (kernels/ops.py declares their schemas).

If they cannot be built here the torch reference serves instead, with one warning."""
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
_DTYPES = (torch.float32, torch.bfloat16)
_lock = threading.Lock()
_library: Path | None = None
_failed = False


def _flags() -> list[str]:
    from torch.utils import cpp_extension  # imported only to build: it is slow to import
    libs = cpp_extension.library_paths()
    return (["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-w",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
            + [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-L{p}" for p in libs]
            + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu", "-ltorch"])


def _build() -> Path:
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256(_SOURCE.read_bytes() + f"{compiler} {torch.__version__}".encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"cpu_kernels-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: replicas starting together never load half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        subprocess.run([compiler, str(_SOURCE), *_flags(), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    return target


def library() -> Path | None:
    """The loaded kernels' file, or None where they cannot be built here. Loaded before a model is
    traced (the loader calls this), so that tracing only reads the result."""
    global _library, _failed
    if _library is not None or _failed:
        return _library
    from splitfuse.kernels import ops  # noqa: F401  the schemas the library implements
    with _lock:
        if _library is None and not _failed:
            try:
                path = _build()
                torch.ops.load_library(str(path))
                _library = path
            except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                _failed = True
                detail = getattr(e, "stderr", "") or str(e)
                print(f"splitfuse: CPU kernels unavailable, using the slower torch reference: {detail}",
                      file=sys.stderr)
    return _library


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the C++ kernels take these: CPU tensors of one supported dtype, a head size that is a
    multiple of 8 (their vector width), and a library built here."""
    dtype = tensors[0].dtype
    return (tensors[0].device.type == "cpu" and dtype in _DTYPES and tensors[0].shape[-1] % 8 == 0
            and all(t.dtype == dtype for t in tensors) and library() is not None)


if __name__ == "__main__":  # `make model` builds them once per machine, so that no first start waits for it
    print(library() or "CPU kernels unavailable: the torch reference serves")
