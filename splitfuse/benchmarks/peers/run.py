"""`make bench-peers`: splitfuse side by side with the serving engines a user could pick instead,
on the same token ids, at the same precision, on this machine.

    python -P -m splitfuse.benchmarks.peers.run                          # everything: installs missing peers first
    python -P -m splitfuse.benchmarks.peers.run --quick --only splitfuse,llamacpp

Each system runs in a fresh process (its runner, in its own virtual environment: .venv for
splitfuse and transformers, .venv-vllm, .venv-openvino, .venv-llamacpp for the peers), so "ready
after" is measured cold from process start and splitfuse is measured as its code is now. The
runners read one workload file (token ids and settings) and write one result file; harness.py
says what is timed. Prints the markdown table; writes peers.json and peers.md under
splitfuse/benchmarks/results/."""
import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from splitfuse.compiled.bundled import bundled_model_dir

from . import artifacts, report, venvs, workload
from .harness import progress

PEERS = Path(__file__).resolve().parent
RESULTS = PEERS.parent / "results"
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class System:
    key: str           # what --only names
    label: str         # the table's row
    runner: str        # module under splitfuse/benchmarks/peers
    venv: str | None = None  # a key of venvs.VENVS; None: the project's venv (this interpreter)
    env: dict[str, str] = field(default_factory=dict)


def systems(hf_batch: int) -> list[System]:
    cpus = sorted(os.sched_getaffinity(0))
    all_cpus = f"{cpus[0]}-{cpus[-1]}" if cpus == list(range(cpus[0], cpus[-1] + 1)) else ",".join(map(str, cpus))
    # Without a KV cache size vLLM asks for 0.9 x RAM; "auto" binding reserves a core for the frontend.
    vllm = {"VLLM_CPU_KVCACHE_SPACE": "4"}
    # In run order: vLLM, the slowest to start, last.
    return [
        System("splitfuse", "splitfuse `pipeline()` (defaults)", "splitfuse_runner"),
        System("openvino", "OpenVINO GenAI ContinuousBatchingPipeline", "openvino_runner", "openvino"),
        System("llamacpp", "llama.cpp (`llama-cpp-python`, batched)", "llamacpp_runner", "llamacpp"),
        System("transformers", f"transformers static batch ({hf_batch})", "transformers_runner"),
        System("vllm", "vLLM CPU (`vllm-cpu`, threads bound `auto`)", "vllm_runner", "vllm",
               {**vllm, "VLLM_CPU_OMP_THREADS_BIND": "auto"}),
        System("vllm", f"vLLM CPU (`vllm-cpu`, threads bound `{all_cpus}`, no reserved CPU)", "vllm_runner", "vllm",
               {**vllm, "VLLM_CPU_OMP_THREADS_BIND": all_cpus, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
    ]


def auto_dtype() -> str:
    import torch

    from splitfuse.compiled.loader import resolve_dtype
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[resolve_dtype("auto", torch.device("cpu"))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    keys = list(dict.fromkeys(s.key for s in systems(0)))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(keys), help=f"comma-separated systems among {','.join(keys)}")
    parser.add_argument("--quick", action="store_true", help=f"{workload.QUICK_OFFLINE_REQUESTS} offline requests, "
                                                            f"{workload.QUICK_SINGLE_REPEATS} single-stream prompt")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="every system's precision (default: what splitfuse's dtype='auto' picks here)")
    parser.add_argument("--hf-batch", type=int, default=16, help="transformers' static batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per system")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = set(args.only) - set(keys)
    if unknown or not args.only:
        parser.error(f"unknown systems {sorted(unknown)}; choose among {keys}")
    return args


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lscpu)}
    # Under a hypervisor the name is often only the vendor's ("AMD EPYC"); family and model tell Zen 4 from Zen 5.
    cpu = f"{fields.get('Model name', 'unknown CPU')} (family {fields.get('CPU family', '?')}, model " \
          f"{fields.get('Model', '?')})"
    flags = next((set(line.split(":", 1)[1].split()) for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), set())
    present = [f for f in ISA_FLAGS if f in flags]
    absent = [f for f in ISA_FLAGS if f not in flags]
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30),
            "isa": f"has {', '.join(present) or 'none of ' + '/'.join(ISA_FLAGS)}"
                   + (f"; no {', '.join(absent)}" if absent else "")}


def run_system(system: System, workload_file: Path, result_file: Path, timeout: float) -> dict:
    """Run one runner to completion; its result, or {"error": one line, "log_tail": [...]}."""
    if system.venv is None:  # the project's venv, with the repository root kept off sys.path
        command, cwd = [sys.executable, "-P", "-m", f"splitfuse.benchmarks.peers.{system.runner}"], venvs.REPO
    else:  # by path from elsewhere: the repository root on sys.path would shadow packages (e.g. `kernels`)
        command, cwd = [str(venvs.VENVS[system.venv].python), str(PEERS / f"{system.runner}.py")], result_file.parent
    progress(f"{system.label}: starting")
    spawned = time.time()
    proc = subprocess.Popen(command + [str(workload_file), str(result_file)], cwd=cwd, env={**os.environ, **system.env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    tail: collections.deque[str] = collections.deque(maxlen=30)
    for line in proc.stdout:
        progress(f"  [{system.key}] {line.rstrip()}")
        tail.append(line.rstrip())
    returncode = proc.wait()
    timer.cancel()
    if returncode == 0 and result_file.exists():
        result = json.loads(result_file.read_text())
        result["ready_s"] = result.pop("ready_at") - spawned
        return result
    if returncode < 0:
        timed_out = time.time() - spawned >= timeout
        error = f"killed after the {timeout:.0f} s timeout" if timed_out else f"killed by signal {-returncode}"
    else:
        error = error_line(list(tail)) or f"exit code {returncode}"
    return {"error": error, "log_tail": list(tail)}


def error_line(lines: list[str]) -> str:
    """The line that names the failure: the last one that looks like an exception, else the last one."""
    lines = [line.strip() for line in lines if line.strip()]
    named = [line for line in lines if "Error" in line or "Exception" in line or "error:" in line]
    return ((named or lines or [""])[-1])[:300]


def summarize(system: System, result: dict, work: dict) -> dict:
    row = {"key": system.key, "label": system.label, "env": system.env}
    if "error" in result:
        return {**row, **result}
    asked = work["offline_new_tokens"]
    offline = result["offline_ids"]
    return {**row, "version": result["info"]["version"], "how": result["info"]["how"],
            "offline_tok_s": sum(min(len(ids), asked) for ids in offline) / result["offline_seconds"],
            "single_tok_s": work["single_new_tokens"] / result["single_median_s"],
            "ready_s": result["ready_s"], "settle_seconds": result["settle_seconds"],
            "offline_seconds": result["offline_seconds"],
            "single_seconds": result["single_seconds"],
            "wrong_lengths": sum(len(ids) != asked for ids in offline)
                             + sum(len(ids) != work["single_new_tokens"] for ids in result["single_ids"]),
            "ids": offline}


def prepare(args: argparse.Namespace, selected: list[System], model_dir: Path, dtype: str) -> tuple[dict, dict, list]:
    """Set up the peers' venvs and one-off artifacts: (settings additions, {venv: error}, one-off notes)."""
    extra, failed, notes = {}, {}, []
    for name in dict.fromkeys(s.venv for s in selected if s.venv):
        try:
            record = venvs.ensure(name)
            notes.append(f"{venvs.VENVS[name].folder} set up in {record['seconds']} s ({record['installed_at']})")
        except subprocess.CalledProcessError as e:
            failed[name] = f"setup failed: {e}"
    if "llamacpp" in args.only and "llamacpp" not in failed:
        path, seconds = artifacts.gguf(dtype)
        extra["gguf"] = str(path)
        notes.append(f"GGUF for llama.cpp converted from the bundled one in {seconds:.0f} s")
    if "openvino" in args.only and "openvino" not in failed:
        try:
            path, seconds = artifacts.openvino_ir(model_dir, venvs.VENVS["openvino"].path / "bin" / "optimum-cli")
            extra["openvino_dir"], extra["openvino_export_s"] = str(path), seconds
            notes.append(f"OpenVINO export {seconds:.0f} s")
        except subprocess.CalledProcessError as e:
            failed["openvino"] = f"export failed: {e}"
    return extra, failed, notes


def git_commit() -> str:
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=venvs.REPO, capture_output=True,
                          text=True).stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, load_at_start = time.time(), os.getloadavg()[0]
    auto = auto_dtype()
    dtype = args.dtype or auto
    model_dir = bundled_model_dir()
    selected = [s for s in systems(args.hf_batch) if s.key in args.only]
    work = workload.build(model_dir, args.quick, args.seed)
    extra, failed, one_off = prepare(args, selected, model_dir, dtype)
    work["settings"] = {"model_dir": str(model_dir), "dtype": dtype, "threads": len(os.sched_getaffinity(0)),
                        "max_batch": max(len(work["offline"]), len(work["warmup"])),
                        "max_seq_len": workload.max_sequence_length(), "hf_batch": args.hf_batch, **extra}
    info = {"machine": machine(), "one_off": one_off,
            "settings": {"dtype": dtype, "auto_dtype": auto, "threads": work["settings"]["threads"],
                         "seed": args.seed, "quick": args.quick, "hf_batch": args.hf_batch,
                         "workload": describe(work)},
            "command": " ".join(["python -P -m splitfuse.benchmarks.peers.run"] + (argv if argv is not None else sys.argv[1:])),
            "commit": git_commit()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as scratch:
        workload_file = Path(scratch) / "workload.json"
        workload_file.write_text(json.dumps(work))
        for i, system in enumerate(selected):
            result = ({"error": failed[system.venv]} if system.venv in failed
                      else run_system(system, workload_file, Path(scratch) / f"result-{i}.json", args.timeout))
            rows.append(summarize(system, result, work))
            if system.key == "openvino" and "ready_s" in rows[-1]:
                rows[-1]["one_off"] = {"what": "export", "seconds": extra["openvino_export_s"]}
            info.update(wall_seconds=round(time.time() - started), load_average=[load_at_start, os.getloadavg()[0]])
            text = write(rows, info, args.out, done=i + 1 == len(selected))
    print("\n" + text + "\n")
    progress(f"wrote {args.out / 'peers.json'}, {args.out / 'peers.md'} ({info['wall_seconds']} s)")


def write(rows: list[dict], info: dict, out: Path, done: bool) -> str:
    """peers.json and peers.md (after every system, so a long run leaves its rows so far); the markdown."""
    reference = next((r for r in rows if r["key"] == "transformers" and "ids" in r),
                     next((r for r in rows if "ids" in r), None))
    info["reference"] = reference["label"] if reference else None
    saved = [{k: v for k, v in row.items() if k != "ids"} for row in rows]
    for row, original in zip(saved, rows):
        if reference is not None and original is not reference and "ids" in original:
            row["agreement"] = report.agreement(original["ids"], reference["ids"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps({"rows": saved, "info": info, "complete": done}, indent=1) + "\n")
    text = report.markdown(saved, info) + ("" if done else "\n\n(run in progress: more systems to come)")
    (out / "peers.md").write_text(text + "\n")
    return text


def describe(work: dict) -> str:
    offline = [len(p) for p in work["offline"]]
    return (f"offline: {len(offline)} requests, prompts of random token ids ~ Normal({workload.PROMPT_MEAN}, "
            f"{workload.PROMPT_STD}) clipped to [{workload.PROMPT_MIN}, {workload.PROMPT_MAX}] (drawn: mean "
            f"{sum(offline) / len(offline):.0f}, {min(offline)}-{max(offline)}), {work['offline_new_tokens']} new "
            f"tokens each, EOS ignored, greedy; single stream: {len(work['single'])} prompt(s) of "
            f"{workload.SINGLE_PROMPT} tokens, {work['single_new_tokens']} new tokens, each alone.")


if __name__ == "__main__":
    main()
