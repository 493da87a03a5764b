"""PNG charts of a benchmark report, drawn with matplotlib when it is installed.

matplotlib is an optional extra (``pip install 'contact-worker[charts]'``): without it the
report says the charts were skipped and why. It is imported dynamically, so this module types
the same with and without it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from worker.bench.bounds import INFERRED, PLAIN, binary_entropy, requests_per_contact
from worker.bench.histogram import Histogram

SKIPPED = (
    "Charts skipped: matplotlib is not installed "
    "(`pip install 'contact-worker[charts]'` or `pip install matplotlib`)."
)
COLOURS = {"contact-worker": "tab:blue", "per-change": "tab:red", "batch-fallback": "tab:orange"}


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend, or None if not installed."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _runs(variant: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [("contact-worker", variant["worker"]), *variant["baselines"].items()]


def _save(
    plt: Any, fig: Any, ax: Any, path: Path, title: str, legend: str | None = None
) -> tuple[str, str]:
    """Grid, legend and title on a chart; write it to ``path``; its (file name, title)."""
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name, title


def _versus(
    plt: Any, out: Path, variants: Sequence[Mapping[str, Any]], x_of: Any, x_label: str, name: str
) -> tuple[str, str]:
    """contacts/s of each run against a swept setting, with the limit drawn."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [x_of(v) for v in variants]
    limit = [
        v["limits"]["contacts"] / v["limits"]["limit_s"] if v["limits"]["limit_s"] else None
        for v in variants
    ]
    if any(y is not None for y in limit):
        ax.plot(xs, limit, "k--", label="limit: the time the rate allows")
    for who in ("contact-worker", "per-change", "batch-fallback"):
        points, limits = [], []
        for x, v in zip(xs, variants, strict=True):
            row = dict(_runs(v)).get(who)
            if row is None:
                continue
            points.append((x, row["contacts_per_s"]))
            limit_s = row.get("limits", v["limits"])["limit_s"]
            if who != "contact-worker" and limit_s:
                limits.append((x, row["contacts"] / limit_s))
        if points:
            ax.plot(*zip(*points, strict=True), "o-", color=COLOURS[who], label=who)
        if limits and limits != [(x, y) for x, y in zip(xs, limit, strict=True)]:
            ax.plot(
                *zip(*limits, strict=True),
                ":",
                color=COLOURS[who],
                alpha=0.7,
                label=f"limit for the lines {who} replayed",
            )
    ax.set_xlabel(x_label)
    ax.set_ylabel("contacts settled per second")
    ax.set_yscale("log")
    return _save(plt, fig, ax, out / name, f"contacts/s against {x_label}")


def _requests_per_contact(
    plt: Any, out: Path, variants: Sequence[Mapping[str, Any]]
) -> tuple[str, str]:
    """Requests per contact against the unknown share: bound, halving schemes, measured runs."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    size = variants[0]["limits"]["batch_size"]
    shares = [x / 10000 for x in range(5, 1001)]
    ax.plot(
        shares,
        [max(1 / size, binary_entropy(p)) for p in shares],
        "k--",
        label=f"information bound max(1/B, H(p)), B={size}",
    )
    ax.plot(
        shares,
        [requests_per_contact(size, p, PLAIN) for p in shares],
        ":",
        color="tab:gray",
        label="plain halving (expected)",
    )
    ax.plot(
        shares,
        [requests_per_contact(size, p, INFERRED) for p in shares],
        "-",
        color="tab:green",
        alpha=0.6,
        label="the worker's halving (expected)",
    )
    for who in ("contact-worker", "per-change", "batch-fallback"):
        points = []
        for v in variants:
            row = dict(_runs(v)).get(who)
            if row is not None and row["requests_per_contact"] is not None:
                points.append((v["limits"]["unknown_share"], row["requests_per_contact"]))
        if points:
            ax.plot(*zip(*points, strict=True), "o", color=COLOURS[who], label=f"{who} (measured)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("share of unknown IDs p")
    ax.set_ylabel("requests per contact")
    title = "requests per contact against the share of unknown IDs"
    return _save(plt, fig, ax, out / "requests-per-contact.png", title, legend="small")


def _latency(plt: Any, out: Path, variants: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """The change-to-ack latency distribution (CDF) of every run."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    styles = ["-", "--", ":", "-."]
    for index, v in enumerate(variants):
        for who, data in v["latency_histograms"].items():
            histogram = Histogram.from_json(data)
            if not histogram.count:
                continue
            xs, ys, seen = [], [], 0
            for value, count in histogram.points():
                seen += count
                xs.append(value * 1000)
                ys.append(seen / histogram.count)
            label = who if len(variants) == 1 else f"{v['label']}: {who}"
            ax.step(
                xs,
                ys,
                styles[index % len(styles)],
                where="post",
                color=COLOURS.get(who),
                label=label,
            )
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_xlabel("change-to-ack latency, ms")
    ax.set_ylabel("share of changes acknowledged")
    title = "change-to-ack latency distribution"
    return _save(plt, fig, ax, out / "latency.png", title, legend="x-small")


def draw(out: Path, data: Mapping[str, Any]) -> tuple[list[tuple[str, str]], str]:
    """Draw what the report's variants allow; (file, title) per chart and a note."""
    plt = pyplot()
    if plt is None:
        return [], SKIPPED
    variants = data["variants"]
    charts: list[tuple[str, str]] = []
    notes = []
    sizes = {v["limits"]["batch_size"] for v in variants}
    if len(sizes) > 1:
        charts.append(
            _versus(
                plt,
                out,
                variants,
                lambda v: v["limits"]["batch_size"],
                "batch size",
                "contacts-vs-batch-size.png",
            )
        )
    else:
        notes.append("contacts/s against batch size: one batch size only (see the steady scenario)")
    shares = {round(v["limits"]["unknown_share"], 6) for v in variants}
    if len(shares) > 1:
        charts.append(
            _versus(
                plt,
                out,
                variants,
                lambda v: v["limits"]["unknown_share"],
                "share of unknown IDs",
                "contacts-vs-unknown-share.png",
            )
        )
    else:
        notes.append(
            "contacts/s against the unknown share: one share only (see the stale-ids scenario)"
        )
    if any(share > 0 for share in shares):
        charts.append(_requests_per_contact(plt, out, variants))
    latency = _latency(plt, out, variants)
    if latency is not None:
        charts.append(latency)
    return charts, ("Not drawn here: " + "; ".join(notes) + ".") if notes else ""
