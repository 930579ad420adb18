"""Compiled code kept on disk: a start whose configuration compiled before loads it instead of compiling.

Inductor's own caches (FX graphs, AOTAutograd, built kernels) hold the code, in a folder of ours per torch
version and instruction set (never mixed between machines that share a home directory). A mark per
configuration says that every bucket of it compiled once: its name hashes everything the graphs depend
on (the model's files, dtype, shapes and buckets, our model and kernel sources, torch, the device and its
instruction set), so a mark is never taken for a configuration that would compile anew.

Without the mark, the buckets compile in a process of their own at the lowest CPU priority (`python -P -m
splitfuse.compiled.precompile`), which fills the caches while the engine serves eagerly at nearly full
speed; the engine then compiles against the warm caches, which takes seconds. `splitfuse compile` and
`make model` run the same ahead of time."""
import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import msgspec
import torch

from splitfuse.config import cache_root

log = logging.getLogger("splitfuse.compiled.precompile")  # by name: run with -m, __name__ is __main__

_SOURCES = Path(__file__).parents[1]  # the package: compiled/ and kernels/ shape the graphs
# The KV cache's block count differs with memory; the graphs take it as a dynamic size, and the compile
# process allocates only this many.
PRECOMPILE_BLOCKS = 16


@dataclass(frozen=True)
class CompileSpec:
    """Everything a compiled graph depends on but torch and the machine."""
    model_dir: str
    dtype: str          # "bfloat16", "float32", ...
    device: str         # "cpu" or "cuda"
    block_size: int
    max_num_seqs: int
    max_model_len: int
    buckets: tuple[int, ...]
    batch_invariant: bool = False  # GPU linear layers through kernels/matmul.py (kernels/ops.py)

    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        digest.update(f"{torch.__version__} {machine()}".encode())
        model = Path(self.model_dir)
        for path in sorted(model.glob("*.json")) + sorted(model.glob("*.safetensors")):
            stat = path.stat()
            digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}".encode())
        for path in sorted((_SOURCES / "compiled").rglob("*.py")) + sorted((_SOURCES / "kernels").glob("*.*")):
            digest.update(path.read_bytes())
        return digest.hexdigest()[:24]


def machine() -> str:
    """The instruction set torch's kernels were chosen for, and the GPU's compute capability where there is one."""
    gpu = "-sm%d%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else ""
    return f"{torch.backends.cpu.get_cpu_capability()}{gpu}".lower()


def cache_dir() -> Path:
    return cache_root() / "compiled" / f"torch-{torch.__version__}-{machine()}"


def use_cache_dir() -> None:
    """Inductor's caches in our folder, unless the user named one: called before anything compiles. Importing
    Inductor sets the variable to its default (under /tmp, gone at a reboot), which is replaced."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


def _mark(spec: CompileSpec) -> Path:
    return cache_dir() / "marks" / spec.key()


def is_warm(spec: CompileSpec) -> bool:
    return _mark(spec).is_file()


def mark_warm(spec: CompileSpec) -> None:
    mark = _mark(spec)
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text(json.dumps(asdict(spec)))


def discard(reason: str) -> None:
    """A cache that failed to load: removed whole, with one line; the next compile rebuilds it."""
    log.warning("splitfuse: the compile cache at %s could not be used (%s); rebuilding it", cache_dir(), reason)
    shutil.rmtree(cache_dir(), ignore_errors=True)


def compile_elsewhere(spec: CompileSpec, progress: bool) -> bool:
    """Fill the caches for `spec` from a process of the lowest CPU priority; whether it succeeded. Its
    progress lines are passed on marked as its own (the engine's "compiled n/n" is the switch to compiled)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-P", "-m", "splitfuse.compiled.precompile", "--spec",
                              json.dumps(asdict(spec))], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             errors="replace")
    for line in child.stderr:
        if progress:
            log.info("compile process: %s", line.rstrip())
    ok = child.wait() == 0
    if progress:
        log.info("compile process: %s in %.1fs; loading its code here",
                 "done" if ok else f"failed ({child.returncode})", time.perf_counter() - start)
    return ok


def compile_here(spec: CompileSpec, progress: bool = True) -> None:
    """Load the model of `spec`, compile every bucket in this process and mark the configuration warm."""
    from splitfuse.compiled.loader import DTYPES, load_model
    from splitfuse.compiled.runner import ModelRunner
    from splitfuse.kernels import ops
    use_cache_dir()
    ops.batch_invariant = spec.batch_invariant
    model = load_model(Path(spec.model_dir), DTYPES[spec.dtype], torch.device(spec.device))
    runner = ModelRunner(model, num_blocks=PRECOMPILE_BLOCKS, block_size=spec.block_size,
                         max_num_seqs=spec.max_num_seqs, max_model_len=spec.max_model_len, buckets=list(spec.buckets),
                         compile=True, cuda_graphs=False, spec=spec)
    runner.compile(background=False, progress=progress)  # which marks the configuration warm


def compile_config(config) -> None:
    """`splitfuse compile`: the engine of an EngineConfig, built to compile its buckets here (the block count
    is no part of the graphs: a few blocks do), which marks its configuration warm."""
    from splitfuse.worker.engine import Engine
    if config.eager:
        raise ValueError("--eager compiles nothing; drop it to compile")
    if config.tensor_parallel_size > 1:
        raise ValueError("tensor-parallel ranks compile as they start (their graphs hold the group's collectives)")
    Engine(msgspec.structs.replace(config, num_blocks=PRECOMPILE_BLOCKS, background_compile=False))


def main() -> None:
    parser = argparse.ArgumentParser(description="Compile one configuration's buckets into the on-disk caches.")
    parser.add_argument("--spec", required=True, help="a CompileSpec as JSON")
    spec = json.loads(parser.parse_args().spec)
    os.nice(19)  # the serving process keeps the cores while both want them
    compile_here(CompileSpec(**{**spec, "buckets": tuple(spec["buckets"])}))


if __name__ == "__main__":
    main()
