"""One-off conversions some peers need before they can load the model, cached beside the converted
model (under splitfuse's cache folder) with the seconds they took.

- llama.cpp: a GGUF at the benchmark precision. The bundled GGUF is Q4_1 (token embedding Q8_0);
  its tensors are dequantized and rounded to bf16, which gives exactly the weights of the Hugging
  Face directory the other systems load (that directory is the same GGUF converted to bf16), and
  are written as F32 (fp32 runs) or BF16 (bf16 runs, norms stay F32), metadata and vocabulary
  copied as they are.
- OpenVINO: `optimum-cli export openvino` of the Hugging Face directory, weights in fp32 (the run
  picks the precision)."""
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from splitfuse.compiled.bundled import gguf_path
from splitfuse.config import cache_root

from .harness import progress

SECONDS_FILE = "one-off.json"


def peers_cache() -> Path:
    return cache_root() / "peers"


def gguf(dtype: str) -> tuple[Path, float]:
    """The bundled model as a GGUF file at `dtype` ("fp32" or "bf16"), and the seconds its conversion took."""
    target = peers_cache() / f"smollm2-135m-instruct-{dtype}"
    seconds = _cached(target, f"GGUF at {dtype}", lambda tmp: _write_gguf(tmp / "model.gguf", dtype))
    return target / "model.gguf", seconds


def openvino_ir(model_dir: Path, optimum_cli: Path) -> tuple[Path, float]:
    """The OpenVINO export of `model_dir`, and the seconds the export took."""
    target = peers_cache() / f"{model_dir.name}-openvino"
    command = [str(optimum_cli), "export", "openvino", "--model", str(model_dir), "--task", "text-generation-with-past",
               "--weight-format", "fp32"]
    return target, _cached(target, "OpenVINO export", lambda tmp: subprocess.run(command + [str(tmp)], check=True))


def _cached(target: Path, what: str, make: Callable[[Path], object]) -> float:
    """Make `target` once (into a temporary folder renamed at the end); the seconds it took, then or earlier."""
    if not (target / SECONDS_FILE).exists():
        progress(f"{what}: making {target} (once)")
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        make(tmp)
        (tmp / SECONDS_FILE).write_text(json.dumps({"seconds": time.perf_counter() - start}))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return json.loads((target / SECONDS_FILE).read_text())["seconds"]


def _write_gguf(path: Path, dtype: str) -> None:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import dequantize, quantize

    bf16 = GGMLQuantizationType.BF16
    reader = GGUFReader(gguf_path())
    writer = GGUFWriter(path, reader.fields["general.architecture"].contents())
    for name, f in reader.fields.items():
        # The writer adds the header fields, the architecture and (below) the file type itself.
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        array = f.types[0] == GGUFValueType.ARRAY
        writer.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[-1] if array else None)
    writer.add_file_type(LlamaFileType.ALL_F32 if dtype == "fp32" else LlamaFileType.MOSTLY_BF16)
    for tensor in reader.tensors:
        weights = dequantize(quantize(dequantize(tensor.data, tensor.tensor_type), bf16), bf16).astype(np.float32)
        if dtype == "bf16" and weights.ndim > 1:
            writer.add_tensor(tensor.name, quantize(weights, bf16), raw_dtype=bf16)
        else:
            writer.add_tensor(tensor.name, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
