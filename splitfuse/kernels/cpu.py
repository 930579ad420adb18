"""The C++ CPU kernels (cpu_kernels.cpp): built once per machine with the system C++ compiler (the one
torch.compile's CPU backend uses too) against torch's headers for this CPU's named instruction set,
cached by source, compiler, flags and torch version, and loaded as the torch operators splitfuse_cpu::*
(kernels/schemas.py declares them).

If they cannot be built here the torch reference serves instead, with one warning."""
import hashlib
import logging
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from splitfuse.config import cache_root

log = logging.getLogger("splitfuse.kernels.cpu")  # by name: run with -m, __name__ is __main__

_SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_DTYPES = (torch.float32, torch.bfloat16)
_lock = threading.Lock()
_library: Path | None = None
_failed = False


# A named instruction set per capability that torch's own kernels detected at run time, never -march=native
# alone: a build is cached per target, so a cache shared between machines cannot hand one an instruction
# it lacks. -mtune=native only schedules.
_TARGETS = {"AVX512": ["-march=x86-64-v4", "-mtune=native"], "AVX2": ["-march=x86-64-v3", "-mtune=native"]}


def target() -> list[str]:
    """The compiler's instruction-set flags for this CPU (the compiler's default where none is named), with
    AVX-512 BF16's dot products where the CPU has them (no x86-64 level includes them): bf16 attention uses them."""
    flags = _TARGETS.get(torch.backends.cpu.get_cpu_capability(), [])
    return [*flags, "-mavx512bf16"] if "-march=x86-64-v4" in flags and torch.cpu._is_avx512_bf16_supported() else flags


def _flags() -> list[str]:
    from torch.utils import cpp_extension  # imported only to build: it is slow to import
    libs = cpp_extension.library_paths()
    return (["-O3", *target(), "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++20",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
            + [f"-isystem{p}" for p in cpp_extension.include_paths()] + [f"-L{p}" for p in libs]
            + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu", "-ltorch"])


def _build() -> Path:
    compiler = os.environ.get("CXX", "g++")
    flags = _flags()
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([compiler, torch.__version__, *flags]).encode())
    target_file = cache_root() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if not target_file.is_file():
        target_file.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: replicas starting together never load half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target_file.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, str(_SOURCE), *flags, "-o", tmp], check=True, capture_output=True, text=True)
        except BaseException:
            os.unlink(tmp)
            raise
        os.replace(tmp, target_file)
    return target_file


def library() -> Path | None:
    """The loaded kernels' file, or None where they cannot be built here. Loaded before a model is
    traced (the loader calls this), so that tracing only reads the result."""
    global _library, _failed
    if _library is not None or _failed:
        return _library
    from splitfuse.kernels import schemas  # noqa: F401  the schemas the library implements
    with _lock:
        if _library is None and not _failed:
            try:
                path = _build()
                torch.ops.load_library(str(path))
                _library = path
            except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
                _failed = True
                log.warning("splitfuse: the CPU kernels could not be built or loaded here (%s); the slower torch "
                            "reference serves instead.", _first_error(e))
    return _library


def has_bf16_gemm() -> bool:
    """Whether bf16 linears take the brgemm kernel: the CPU has bf16 dot products (AVX-512 BF16) or AMX tiles,
    which ATen's batch-reduce GEMM uses, oneDNN computes bf16 (ONEDNN_MAX_CPU_ISA can stop it below), and the
    kernels are built."""
    return ((torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
            and torch.ops.mkldnn._is_mkldnn_bf16_supported() and library() is not None)


def has_amx() -> bool:
    """Whether that kernel runs on AMX tiles (the engine's default budget while no request streams follows)."""
    return torch.cpu._is_amx_tile_supported() and has_bf16_gemm()


def _first_error(e: Exception) -> str:
    """The compiler's first error line, or what failed in a few words."""
    if isinstance(e, subprocess.CalledProcessError):
        errors = [line.strip() for line in (e.stderr or "").splitlines() if "error" in line]
        return errors[0] if errors else f"{e.cmd[0]} exited with status {e.returncode}"
    return (str(e).splitlines() or [type(e).__name__])[0]


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the C++ kernels take these: CPU tensors of one supported dtype, a head size that is a
    multiple of 8 (their vector width), and a library built here."""
    dtype = tensors[0].dtype
    return (tensors[0].device.type == "cpu" and dtype in _DTYPES and tensors[0].shape[-1] % 8 == 0
            and all(t.dtype == dtype for t in tensors) and library() is not None)


if __name__ == "__main__":  # `make model` builds them once per machine, so that no first start waits for it
    print(library() or "CPU kernels unavailable: the torch reference serves")
