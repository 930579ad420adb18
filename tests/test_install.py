"""The working directory never shadows an installed package. Every process the project starts runs with
Python's -P, so that a folder or module in the directory it was started from (a clone of this
repository, or a user's project) is not importable under its own name: Hugging Face's `kernels`
package, which transformers imports, was once shadowed that way.

The oracle is Python's import system itself: decoy modules under the names that collided or could
collide record any import of them, and the demo, a served worker and a benchmark are started from
their folder."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Ordinary names on the package index, once or still folders of this repository.
DECOYS = ("kernels", "worker", "compiled", "frontend", "benchmarks", "config", "protocol", "cli", "splitfuse")


def decoy_folder(folder: Path) -> Path:
    """Decoy modules in `folder`, each appending its name to the returned file when imported."""
    record = folder / "imported.txt"
    for name in DECOYS:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"open({str(record)!r}, 'a').write({name!r} + '\\n')\n")
    return record


def test_make_runs_every_python_with_the_working_directory_off_sys_path():
    targets = ["setup", "model", "demo", "test", "test-latest", "lock", "bench", "bench-peers"]
    recipes = subprocess.run(["make", "-n", "-B", *targets], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
    calls = re.findall(r"(\S*python3?)( \S+)", recipes)
    assert len(calls) > 10, recipes  # the recipes were read
    assert all(flag == " -P" for _, flag in calls), [c for c in calls if c[1] != " -P"]


def test_demo_worker_and_benchmark_started_among_decoys_import_none(tmp_path):
    record = decoy_folder(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    commands = {
        # the frontend process and a worker process, each started by the one before
        "demo": [sys.executable, "-P", "-m", "splitfuse.cli", "demo", "--device", "cpu", "--eager",
                 "--max-new-tokens", "2", "--num-blocks", "256"],
        "benchmark": [sys.executable, "-P", "-m", "splitfuse.benchmarks.forward", "--device", "cpu", "--tokens", "8",
                      "--reps", "1", "--no-compile"],
    }
    for what, command in commands.items():
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{what}: {result.stderr[-3000:]}"
        assert not record.exists(), f"{what} imported the decoys {record.read_text().split()}"
