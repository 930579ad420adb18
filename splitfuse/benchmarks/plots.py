"""The three figures of FastGen's evaluation, one panel per workload: latency vs throughput,
effective throughput vs clients, and the CDF of per-token latency at the highest load."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

from .metrics import token_gaps  # noqa: E402
from .report import PresetResults  # noqa: E402

STYLE = {"splitfuse": dict(color="tab:blue", marker="o"), "prefill-first": dict(color="tab:orange", marker="x")}


def _panels(results: dict[str, PresetResults]):
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    return fig, zip(axes[0], results.items())


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_vs_throughput(results: dict[str, PresetResults], path: Path) -> Path:
    fig, panels = _panels(results)
    for ax, (name, r) in panels:
        for backend, runs in r.summaries().items():
            xs = [s.requests_per_s for s in runs.values()]
            ax.plot(xs, [s.latency_s.mean for s in runs.values()], label=f"{backend} mean", **STYLE.get(backend, {}))
            ax.plot(xs, [s.latency_s.percentiles[95] for s in runs.values()], linestyle=":", alpha=0.7,
                    label=f"{backend} P95", **STYLE.get(backend, {}))
            for n, x, s in zip(runs, xs, runs.values()):
                ax.annotate(str(n), (x, s.latency_s.mean), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(title=r.preset.describe().split(" (")[0], xlabel="throughput (requests/s)",
               ylabel="end-to-end latency (s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def effective_throughput(results: dict[str, PresetResults], path: Path) -> Path:
    fig, panels = _panels(results)
    for ax, (name, r) in panels:
        for backend, runs in r.summaries().items():
            clients = list(runs)
            ax.plot(clients, [s.effective_rps_ema for s in runs.values()], label=f"{backend} (EMA)",
                    **STYLE.get(backend, {}))
            ax.plot(clients, [s.effective_rps_cumulative for s in runs.values()], linestyle="--", alpha=0.6,
                    label=f"{backend} (cumulative)", **STYLE.get(backend, {}))
        sla = r.sla
        ax.set(title=f"{name}: SLA {sla.prompt_tokens_per_s:.0f} prompt / {sla.gen_tokens_per_s:.1f} gen tok/s",
               xlabel="concurrent clients", ylabel="effective throughput (requests/s)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def token_latency_cdf(results: dict[str, PresetResults], path: Path) -> Path:
    fig, panels = _panels(results)
    for ax, (name, r) in panels:
        for backend, runs in r.serving.items():
            top = max(runs)
            gaps = sorted(1000 * g for t in runs[top] if t.completed for g in token_gaps(t))
            if gaps:
                ax.plot(gaps, [(i + 1) / len(gaps) for i in range(len(gaps))], label=f"{backend}, {top} clients",
                        color=STYLE.get(backend, {}).get("color"))
        ax.axvline(1000 / r.sla.gen_tokens_per_s, color="gray", linestyle=":", label="1 / S_gen")
        ax.set(title=f"{name}: CDF of the gaps between tokens", xlabel="per-token latency (ms, log scale)",
               ylabel="fraction of tokens", xscale="log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def all_plots(results: dict[str, PresetResults], out_dir: Path) -> list[Path]:
    return [latency_vs_throughput(results, out_dir / "latency_vs_throughput.png"),
            effective_throughput(results, out_dir / "effective_throughput.png"),
            token_latency_cdf(results, out_dir / "token_latency_cdf.png")]
