"""The report of ``deltatune compare``: a table, plots and one verdict per promise, all from the rows.

``report.md`` and a self-contained ``report.html`` (plots inline as PNG data, no scripts, opens
offline). Rows of several seeds are averaged (mean and spread); verdicts use the largest training
set and compare each method with full fine-tuning when it was run, else with the zero-shot model.
Every sentence is computed from ``compare.json``; none is written by hand.
"""

from __future__ import annotations

import base64
import html
import io
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from deltatune.atomic import atomic_write_bytes

PEFT_PROMISES = ("quality", "faster training", "lower memory", "compact checkpoints", "less forgetting")
PEFT_PROMISES += ("less overfitting", "low-data regime")


def _metric(row: dict[str, Any]) -> float:
    return float(row["test"][row["main_metric"]])


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (method, size): seed means of the figures, and the metric's spread."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["size"])].append(row)
    out = []
    for (method, size), group in groups.items():
        metrics = [_metric(r) for r in group]

        def mean(key: str, group: list[dict[str, Any]] = group) -> float | None:
            values = [r[key] for r in group if r.get(key) is not None]
            return statistics.fmean(values) if values else None

        forgetting = [r["forgetting"]["change"] for r in group if r.get("forgetting")]
        out.append(
            {
                "method": method,
                "size": size,
                "seeds": len(group),
                "main_metric": group[0]["main_metric"],
                "metric": statistics.fmean(metrics),
                "spread": statistics.stdev(metrics) if len(metrics) > 1 else 0.0,
                "zero_shot": float(group[0]["zero_shot"][group[0]["main_metric"]]),
                "trainable_params": group[0]["trainable_params"],
                "trainable_percent": group[0]["trainable_percent"],
                "train_seconds": mean("train_seconds"),
                "tokens_per_s": mean("tokens_per_s"),
                "peak_memory_mib": mean("peak_memory_mib"),
                "adapter_bytes": mean("adapter_bytes"),
                "full_model_bytes": mean("full_model_bytes"),
                "forgetting": statistics.fmean(forgetting) if forgetting else None,
                "overfitting_gap": mean("overfitting_gap"),
                "best_step": mean("best_step"),
                "steps": mean("steps"),
                "lr": group[0].get("lr"),
            }
        )
    return sorted(out, key=lambda e: (e["size"] or float("inf"), e["method"]))


def _largest(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    size = max((e["size"] or float("inf")) for e in entries)
    return [e for e in entries if (e["size"] or float("inf")) == size]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def verdicts(entries: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One verdict per promise, each a sentence computed from the figures."""
    found: list[dict[str, str]] = []
    top = _largest(entries)
    by_method = {e["method"]: e for e in top}
    full = by_method.get("full")
    peft = [e for e in top if e["method"] != "full"]
    if not peft:
        return found
    metric = top[0]["main_metric"]
    higher = metric not in ("loss", "perplexity")
    if full is not None:
        parts = []
        for e in peft:
            share = _ratio(e["metric"], full["metric"])
            time_ratio = _ratio(e["train_seconds"], full["train_seconds"])
            spread = f" ± {e['spread']:.3f}" if e["seeds"] > 1 else ""
            if higher and share is not None:
                head = f"{e['method']} reached {100 * share:.0f} % of full fine-tuning's {metric}"
            else:  # a loss: lower is better, and a share of it says nothing
                head = f"{e['method']}'s {metric} against full fine-tuning's"
            parts.append(
                f"{head} ({e['metric']:.3f}{spread} vs {full['metric']:.3f}) with {e['trainable_percent']:.2f} % "
                "of the parameters" + (f" in {time_ratio:.2f} of the time" if time_ratio is not None else "")
            )
        tolerance = 0.01 if higher else 0.02 * abs(full["metric"])  # 1 point of a rate, 2 % of a loss
        close = [
            e["method"]
            for e in peft
            if (full["metric"] - e["metric"] if higher else e["metric"] - full["metric"]) <= tolerance
        ]
        found.append(
            {
                "promise": "quality",
                "verdict": "; ".join(parts)
                + (". Within 1 point of full fine-tuning" if higher else ". Within 2 % of full fine-tuning's loss")
                + " (or better): "
                + (", ".join(close) or "none")
                + ".",
            }
        )
        for promise, key, word in (
            ("faster training", "train_seconds", "time"),
            ("lower memory", "peak_memory_mib", "peak memory"),
        ):
            ratios = {e["method"]: _ratio(e[key], full[key]) for e in peft}
            holds = [m for m, r in ratios.items() if r is not None and r < 1]
            found.append(
                {
                    "promise": promise,
                    "verdict": f"{word} against full fine-tuning's: "
                    + ", ".join(f"{m} {r:.2f}x" for m, r in ratios.items() if r is not None)
                    + f". Holds for {', '.join(holds) or 'none'}.",
                }
            )
    else:
        gains = [f"{e['method']} {e['zero_shot']:.3f} -> {e['metric']:.3f}" for e in peft]
        found.append({"promise": "quality", "verdict": f"{metric} from zero-shot: " + ", ".join(gains) + "."})
    sizes = [(e["method"], _ratio(e["adapter_bytes"], e["full_model_bytes"])) for e in peft]
    found.append(
        {
            "promise": "compact checkpoints",
            "verdict": "checkpoint size against the full model's: "
            + ", ".join(f"{m} {100 * r:.2f} %" for m, r in sizes if r is not None)
            + ".",
        }
    )
    changes = {e["method"]: e["forgetting"] for e in top if e["forgetting"] is not None}
    if changes:
        reference = changes.get("full")
        text = "change of the general-text loss (forgetting): " + ", ".join(f"{m} {c:+.4f}" for m, c in changes.items())
        if reference is not None:
            less = [m for m, c in changes.items() if m != "full" and c < reference]
            text += f". Less than full fine-tuning's for {', '.join(less) or 'none'}"
        found.append({"promise": "less forgetting", "verdict": text + "."})
    gaps = {e["method"]: e["overfitting_gap"] for e in top if e["overfitting_gap"] is not None}
    if gaps:
        text = "validation loss minus final training loss: " + ", ".join(f"{m} {g:+.4f}" for m, g in gaps.items())
        if "full" in gaps:
            less = [m for m, g in gaps.items() if m != "full" and g < gaps["full"]]
            text += f". Smaller gap than full fine-tuning's for {', '.join(less) or 'none'}"
        found.append({"promise": "less overfitting", "verdict": text + "."})
    smallest = min((e["size"] or float("inf")) for e in entries)
    if smallest != max((e["size"] or float("inf")) for e in entries):
        low = {e["method"]: e for e in entries if (e["size"] or float("inf")) == smallest}
        if "full" in low:
            better = [
                m
                for m, e in low.items()
                if m != "full"
                and ((e["metric"] > low["full"]["metric"]) == higher)
                and e["metric"] != low["full"]["metric"]
            ]
            found.append(
                {
                    "promise": "low-data regime",
                    "verdict": f"with {smallest} training examples, better than full fine-tuning "
                    f"({low['full']['metric']:.3f}): {', '.join(better) or 'none'}.",
                }
            )
    return found


# -- plots ----------------------------------------------------------------------------------------
def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def plots(result: dict[str, Any], entries: list[dict[str, Any]]) -> dict[str, bytes]:
    """Title -> PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = _largest(entries)
    metric = top[0]["main_metric"]
    images: dict[str, bytes] = {}

    figure, axis = plt.subplots(figsize=(6, 4))
    for e in top:
        axis.scatter(e["trainable_params"], e["metric"])
        axis.annotate(e["method"], (e["trainable_params"], e["metric"]), textcoords="offset points", xytext=(4, 4))
    axis.axhline(top[0]["zero_shot"], color="grey", ls="--", lw=1, label="zero-shot")
    axis.set(xscale="log", xlabel="trainable parameters (log scale)", ylabel=f"test {metric}")
    axis.legend()
    images[f"test {metric} against trainable parameters"] = _png(figure)

    names = [e["method"] for e in top]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(names, [e["train_seconds"] or 0 for e in top])
    axes[0].set(ylabel="training seconds", title="time")
    axes[1].bar(names, [e["peak_memory_mib"] or 0 for e in top])
    axes[1].set(ylabel="peak memory (MiB)", title="peak memory")
    images["time and peak memory per method"] = _png(figure)

    figure, axis = plt.subplots(figsize=(6, 4))
    axis.bar(names, [max(e["adapter_bytes"] or 1, 1) / 2**20 for e in top])
    axis.set(yscale="log", ylabel="checkpoint MiB (log scale)")
    images["checkpoint size"] = _png(figure)

    if any(e["forgetting"] is not None for e in top):
        figure, axis = plt.subplots(figsize=(6, 4))
        axis.bar(names, [e["forgetting"] or 0 for e in top])
        axis.axhline(0, color="black", lw=0.8)
        axis.set(ylabel="change of general-text loss")
        images["forgetting"] = _png(figure)

    largest = max((r["size"] or float("inf")) for r in result["rows"])
    curves = [
        r for r in result["rows"] if (r["size"] or float("inf")) == largest and r["seed"] == result["rows"][0]["seed"]
    ]
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for row in curves:
        (line,) = axis.plot(*zip(*row["curves"]["train"]), lw=1, label=f"{row['method']} train")
        if row["curves"]["validation"]:
            axis.plot(
                *zip(*row["curves"]["validation"]),
                color=line.get_color(),
                ls="--",
                marker="o",
                label=f"{row['method']} validation",
            )
    axis.set(xlabel="step", ylabel="loss", yscale="log")
    axis.legend(fontsize=7, ncol=2)
    images["training and validation loss"] = _png(figure)

    sizes = sorted({e["size"] for e in entries}, key=lambda n: n or float("inf"))
    if len(sizes) > 1:
        figure, axis = plt.subplots(figsize=(6, 4))
        positions = list(range(len(sizes)))
        for method in dict.fromkeys(e["method"] for e in entries):
            points = {e["size"]: e["metric"] for e in entries if e["method"] == method}
            axis.plot([positions[sizes.index(s)] for s in points], list(points.values()), marker="o", label=method)
        axis.set_xticks(positions, [str(s or "all") for s in sizes])
        axis.set(xlabel="training examples", ylabel=f"test {metric}")
        axis.legend(fontsize=8)
        images[f"test {metric} against training-set size"] = _png(figure)
    return images


# -- files ----------------------------------------------------------------------------------------
COLUMNS = ("method", "size", "lr", "metric", "trainable", "time s", "tok/s", "peak MiB", "checkpoint MiB", "forgetting")


def _cells(e: dict[str, Any]) -> list[str]:
    spread = f" ± {e['spread']:.3f}" if e["seeds"] > 1 else ""
    return [
        e["method"],
        str(e["size"] or "all"),
        f"{e['lr']:g}" if e["lr"] else "",
        f"{e['metric']:.4f}{spread} (zero-shot {e['zero_shot']:.4f})",
        f"{e['trainable_params']:,} ({e['trainable_percent']:.3f} %)",
        f"{e['train_seconds']:.0f}" if e["train_seconds"] is not None else "",
        f"{e['tokens_per_s']:.0f}" if e["tokens_per_s"] is not None else "",
        f"{e['peak_memory_mib']:.0f}" if e["peak_memory_mib"] is not None else "",
        f"{(e['adapter_bytes'] or 0) / 2**20:.2f}",
        f"{e['forgetting']:+.4f}" if e["forgetting"] is not None else "",
    ]


def write_reports(result: dict[str, Any], output: Path) -> None:
    """report.md (with the plots as PNG files beside it) and report.html (plots inline)."""
    entries = summarise(result["rows"])
    found = verdicts(entries)
    images = plots(result, entries)
    metric = entries[0]["main_metric"]
    md = [f"# deltatune compare: test {metric}", ""]
    md += ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    md += ["| " + " | ".join(_cells(e)) + " |" for e in entries]
    md += ["", "## Verdicts", ""] + [f"- **{v['promise']}**: {v['verdict']}" for v in found] + [""]
    for index, (title, png) in enumerate(images.items()):
        name = f"report-{index}.png"
        atomic_write_bytes(output / name, png)
        md += [f"## {title}", "", f"![{title}]({name})", ""]
    atomic_write_bytes(output / "report.md", "\n".join(md).encode())

    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(e)) + "</tr>" for e in entries)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    items = "".join(f"<li><b>{html.escape(v['promise'])}</b>: {html.escape(v['verdict'])}</li>" for v in found)
    figures = "".join(
        f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{base64.b64encode(p).decode()}">'
        f"<figcaption>{html.escape(t)}</figcaption></figure>"
        for t, p in images.items()
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>deltatune compare</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}img{{max-width:100%}}figure{{margin:1.5em 0}}</style>
</head><body><h1>deltatune compare: test {html.escape(metric)}</h1>
<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>
<h2>Verdicts</h2><ul>{items}</ul>{figures}</body></html>
"""
    atomic_write_bytes(output / "report.html", page.encode())
