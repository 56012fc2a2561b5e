"""The demo's picture: TTFT with and without FlexKV, and where each turn's prompt tokens came from."""

from __future__ import annotations

import random
from pathlib import Path

from dynamo_flexkv.demo.passes import PassResult
from dynamo_flexkv.demo.report import SOURCES, sources

COLORS = {"GPU hit": "#4c72b0", "CPU tier": "#55a868", "SSD tier": "#8172b2", "cluster tier": "#dd8452",
          "recomputed": "#c44e52"}
PASS_COLORS = {"baseline": "#c44e52", "flexkv": "#55a868", "cluster": "#dd8452"}


def write_png(results: list[PassResult], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, (ttft_ax, source_ax) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 1.5]})
    _ttft(ttft_ax, results)
    _sources(source_ax, results)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ttft(ax, results: list[PassResult]) -> None:
    """Each request's TTFT, first turns and returning turns apart, with a box per group."""
    jitter = random.Random(0)
    groups, labels = [], []
    for result in results:
        for returning in (False, True):
            groups.append([r.ttft_ms for r in result.records if (r.turn > 0) == returning])
            labels.append(f"{result.name}\n{'returning' if returning else 'first'} turns")
    ax.boxplot(groups, showfliers=False, widths=0.5)
    for i, values in enumerate(groups, start=1):
        color = PASS_COLORS[labels[i - 1].split("\n")[0]]
        ax.scatter([i + jitter.uniform(-0.18, 0.18) for _ in values], values, s=9, alpha=0.6, color=color)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.set_ylabel("time to first token (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("TTFT of every request, all repetitions", fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def _sources(ax, results: list[PassResult]) -> None:
    """Prompt tokens per turn index (summed over users and repetitions), stacked by where they came from."""
    turns = sorted({r.turn for result in results for r in result.records})
    width = 0.8 / max(1, len(results))
    for p, result in enumerate(results):
        xs = [t + (p - (len(results) - 1) / 2) * width for t in turns]
        bottom = [0] * len(turns)
        for source in SOURCES:
            heights = [sum(sources(r)[source] for r in result.records if r.turn == t) for t in turns]
            ax.bar(xs, heights, width * 0.95, bottom=bottom, color=COLORS[source],
                   label=source if p == 0 else None, edgecolor="white", linewidth=0.4)
            bottom = [b + h for b, h in zip(bottom, heights)]
        for x, total in zip(xs, bottom):
            ax.text(x, total, result.name, ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(turns, [f"turn {t + 1}" for t in turns])
    ax.set_ylabel("prompt tokens (all users and repetitions)")
    ax.set_title("Where each turn's prompt tokens came from", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=len(SOURCES), frameon=False)
    ax.margins(y=0.15)
