"""A benchmark run's results: kept as recorded timelines (so every metric can be recomputed from
the JSON file), summarized into markdown tables and the issue's goal checks."""
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .metrics import SLA, Offline, Summary, Timeline, scaled_sla, summarize
from .workload import PRESETS, Preset

# The goals on CPU, checked on the long-prompt preset (effective throughput, P95 token
# latency) and on offline generation throughput.
GOAL_PRESET = "p2600-g128"
GOAL_EFFECTIVE = 2.0
GOAL_P95 = 3.0
GOAL_OFFLINE = {"hf-continuous": 3.0, "hf-static": 2.0}
OURS, BASELINE = "splitfuse", "prefill-first"
# SLA = the single-request speed measured in the run divided by these: a request may see its first
# token 8x later, and its tokens 8x slower, than when it has the machine to itself.
SLA_PROMPT_SLOWDOWN = 8.0
SLA_GEN_SLOWDOWN = 8.0


@dataclass(slots=True)
class PresetResults:
    preset: Preset
    serving: dict[str, dict[int, list[Timeline]]] = field(default_factory=dict)  # scheduler -> clients -> runs
    offline: dict[str, Offline] = field(default_factory=dict)                    # backend -> result
    sla: SLA | None = None

    def summaries(self) -> dict[str, dict[int, Summary]]:
        return {b: {n: summarize(ts, self.sla) for n, ts in runs.items()} for b, runs in self.serving.items()}


def derive_slas(results: dict[str, PresetResults], prompt_slowdown: float, gen_slowdown: float) -> None:
    """Each workload's SLA from its 1-client runs, every scheduler's pooled (so no backend sets its own bar)."""
    for r in results.values():
        alone = [t for runs in r.serving.values() for t in runs.get(1, [])]
        if alone:
            r.sla = scaled_sla(alone, prompt_slowdown, gen_slowdown)


def save(path: Path, results: dict[str, PresetResults], info: dict) -> None:
    """Settings, machine, per preset the SLA, the summaries and the raw timelines."""
    data = {"info": info, "presets": {}}
    for name, r in results.items():
        data["presets"][name] = {
            "description": r.preset.describe(), "sla": asdict(r.sla) if r.sla else None,
            "summaries": {b: {n: asdict(s) for n, s in runs.items()} for b, runs in r.summaries().items()},
            "offline": {b: asdict(o) for b, o in r.offline.items()},
            "timelines": {b: {n: [asdict(t) for t in ts] for n, ts in runs.items()} for b, runs in r.serving.items()},
        }
    path.write_text(json.dumps(data, indent=1))


def load(path: Path) -> tuple[dict[str, PresetResults], dict]:
    data = json.loads(path.read_text())
    results = {}
    for name, p in data["presets"].items():
        serving = {b: {int(n): [Timeline(**t) for t in ts] for n, ts in runs.items()}
                   for b, runs in p["timelines"].items()}
        offline = {b: Offline(**o) for b, o in p["offline"].items()}
        results[name] = PresetResults(PRESETS[name], serving, offline, SLA(**p["sla"]) if p["sla"] else None)
    return results, data["info"]


def serving_table(results: dict[str, PresetResults]) -> str:
    rows = ["| workload | scheduler | clients | done | req/s | output tok/s | latency P50 / P95 (s) "
            "| TTFT P50 / P95 (s) | token latency P50 / P95 (ms) | met SLA: EMA / cumulative "
            "| effective req/s: EMA / cumulative |",
            "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, r in results.items():
        for backend, runs in r.summaries().items():
            for n, s in runs.items():
                rows.append(
                    f"| {name} | {backend} | {n} | {s.completed}/{s.requests} | {s.requests_per_s:.2f} "
                    f"| {s.output_tokens_per_s:.1f} "
                    f"| {_pair(s.latency_s.percentiles, 1)} | {_pair(s.ttft_s.percentiles, 1)} "
                    f"| {_pair(s.token_latency_s.percentiles, 1000, '.0f')} "
                    f"| {s.sla_fraction_ema:.0%} / {s.sla_fraction_cumulative:.0%} "
                    f"| {s.effective_rps_ema:.2f} / {s.effective_rps_cumulative:.2f} |")
    return "\n".join(rows)


def offline_table(results: dict[str, PresetResults]) -> str:
    rows = ["| workload | backend | requests | seconds | req/s | output tok/s | total tok/s | splitfuse is |",
            "|---|---|--:|--:|--:|--:|--:|--:|"]
    for name, r in results.items():
        ours = r.offline.get(OURS)
        for backend, o in r.offline.items():
            ratio = f"{ours.output_tokens_per_s / o.output_tokens_per_s:.2f}x" if ours and backend != OURS else ""
            rows.append(f"| {name} | {backend} | {o.requests} | {o.seconds:.1f} | {o.requests_per_s:.2f} "
                        f"| {o.output_tokens_per_s:.1f} | {o.total_tokens_per_s:.1f} | {ratio} |")
    return "\n".join(rows)


def sla_lines(results: dict[str, PresetResults], prompt_slowdown: float, gen_slowdown: float) -> str:
    lines = [f"SLA per workload: single-request speed measured in this run (1 client, all schedulers pooled) "
             f"divided by {prompt_slowdown:g} for prompts and {gen_slowdown:g} for generation; EMA span 16."]
    for name, r in results.items():
        if r.sla:
            lines.append(f"- {name}: S_prompt = {r.sla.prompt_tokens_per_s:.0f} tokens/s, "
                         f"S_gen = {r.sla.gen_tokens_per_s:.1f} tokens/s (a token every "
                         f"{1000 / r.sla.gen_tokens_per_s:.0f} ms)")
    return "\n".join(lines)


def goal_lines(results: dict[str, PresetResults]) -> str:
    """Scheduler comparison for every workload (goals checked on GOAL_PRESET), then offline throughput."""
    lines = []
    for name, r in results.items():
        summaries = r.summaries()
        if OURS not in summaries or BASELINE not in summaries:
            continue
        ours, base = summaries[OURS], summaries[BASELINE]
        best_ours = max(ours.items(), key=lambda kv: kv[1].effective_rps_ema)
        best_base = max(base.items(), key=lambda kv: kv[1].effective_rps_ema)
        top = max(set(ours) & set(base))
        p95_ours = ours[top].token_latency_s.percentiles[95]
        p95_base = base[top].token_latency_s.percentiles[95]
        effective = _ratio(best_ours[1].effective_rps_ema, best_base[1].effective_rps_ema)
        p95 = _ratio(p95_base, p95_ours)
        goal = name == GOAL_PRESET
        lines.append(f"- {name}: peak effective throughput (EMA) {best_ours[1].effective_rps_ema:.2f} req/s at "
                     f"{best_ours[0]} clients vs {best_base[1].effective_rps_ema:.2f} at {best_base[0]}: "
                     f"{effective:.2f}x{_verdict(effective, GOAL_EFFECTIVE) if goal else ''}; P95 token latency "
                     f"at {top} clients {1000 * p95_ours:.0f} ms vs {1000 * p95_base:.0f} ms: prefill-first's is "
                     f"{p95:.2f}x ours{_verdict(p95, GOAL_P95) if goal else ''}")
    for name, r in results.items():
        ours = r.offline.get(OURS)
        for backend, target in GOAL_OFFLINE.items():
            if ours and backend in r.offline:
                ratio = _ratio(ours.output_tokens_per_s, r.offline[backend].output_tokens_per_s)
                lines.append(f"- {name} offline: splitfuse {ratio:.2f}x {backend}{_verdict(ratio, target)}")
    return "\n".join(lines)


def markdown(results: dict[str, PresetResults], info: dict) -> str:
    machine = info.get("machine", {})
    settings = info.get("settings", {})
    parts = ["### Machine", ", ".join(f"{k}: {v}" for k, v in machine.items()),
             "### Settings", ", ".join(f"{k}: {v}" for k, v in settings.items()),
             "### Workloads", "\n".join(f"- {r.preset.describe()}" for r in results.values()),
             "### Serving (closed-loop streaming clients)",
             sla_lines(results, settings.get("sla_prompt_slowdown", math.nan),
                       settings.get("sla_gen_slowdown", math.nan)),
             "", serving_table(results),
             "### Offline throughput (all requests at once)", offline_table(results),
             "### Against the goals", goal_lines(results)]
    return "\n\n".join(parts)


def _pair(percentiles: dict, scale: float, fmt: str = ".2f") -> str:
    return f"{percentiles[50] * scale:{fmt}} / {percentiles[95] * scale:{fmt}}"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def _verdict(ratio: float, target: float) -> str:
    if ratio >= target:
        return f" (goal {target:g}x: met)"
    return f" (goal {target:g}x: missed{f' by {target / ratio:.2f}x' if ratio > 0 else ''})"
