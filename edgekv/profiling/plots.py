"""PNG plots of profile results: decode latency and peak memory vs context length, one
line per setting (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from edgekv.errors import EdgekvError

MiB = 2 ** 20


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EdgekvError("--plot needs matplotlib: pip install 'edgekv[profile]' "
                          "(or pip install matplotlib)") from None


def plot(runs: list[tuple[str, dict]], out: str | Path, title: str | None = None) -> Path:
    """runs: [(label prefix, profile document)]; prefixes tell runs apart in --compare
    (the second run's lines are dashed)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(s["name"] for _, doc in runs for s in doc["settings"]))
    for i, (prefix, doc) in enumerate(runs):
        style = "-" if i == 0 else "--"
        for s in doc["settings"]:
            rows = sorted(s["rows"], key=lambda r: r["prompt_len"])
            if not rows:
                continue
            x = [r["prompt_len"] for r in rows]
            color = colors[names.index(s["name"]) % len(colors)]
            label = f"{prefix}{s['name']}"
            ax_lat.plot(x, [r["decode_ms_p50"] for r in rows], style, marker="o", color=color, label=label)
            ax_lat.fill_between(x, [r["decode_ms_p50"] for r in rows], [r["decode_ms_p90"] for r in rows],
                                color=color, alpha=0.12, linewidth=0)
            ax_mem.plot(x, [r["peak_rss_bytes"] / MiB for r in rows], style, marker="o", color=color, label=label)
    lens = sorted({r["prompt_len"] for _, doc in runs for s in doc["settings"] for r in s["rows"]})
    from matplotlib.ticker import NullFormatter

    for ax in (ax_lat, ax_mem):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lens, [str(n) for n in lens])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("prompt length (tokens of context before decoding)")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
    ax_lat.set_ylabel("decode latency per token, ms (p50; band to p90)")
    ax_mem.set_ylabel("peak RSS, MiB")
    ax_lat.set_title("decode latency vs context")
    ax_mem.set_title("memory vs context")
    ax_mem.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
