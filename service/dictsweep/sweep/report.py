"""The sweep's picture: eval L0 against eval FVU for every finished SAE and baseline, as PNG bytes.

Per (architecture, dictionary size), every SAE is a dot and a curve joins that group's own Pareto
front (no other point of the group is at least as good on both L0 and FVU); selected SAEs are
ringed, SAEs the selection rejected outright (outside the L0 band or a quality bound) are hollow,
and the L0 band is shaded; each baseline kind is a dotted row of markers at its k's. FVU is shown up to max(1, the
worst SAE's); a baseline worse than that (random directions at small k can exceed 1) sits on the top
edge as a triangle labelled with its value. Built on matplotlib's Agg canvas directly (no pyplot,
no global state), like `sae.plots`.
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dictsweep.sweep.select import pareto_front

BASELINE_STYLES = {
    "pca": ("s", "black"),
    "ica": ("D", "tab:brown"),
    "random": ("x", "tab:gray"),
    "identity": ("P", "tab:olive"),
}  # marker, colour


def interval(half_width: float | None) -> float:
    """An error bar's half length: 0 where there is no interval (one seed)."""
    return 0.0 if half_width is None or half_width != half_width else float(half_width)


def pareto_plot(
    saes: list[dict], baselines: list[dict], title: str = "", band: tuple[float, float] | None = None
) -> bytes:
    """PNG bytes of `pareto_figure`."""
    buffer = io.BytesIO()
    pareto_figure(saes, baselines, title, band).savefig(buffer, format="png")
    return buffer.getvalue()


def pareto_figure(
    saes: list[dict], baselines: list[dict], title: str = "", band: tuple[float, float] | None = None
) -> Figure:
    """Eval FVU against eval L0.

    `saes`: {"architecture", "n_latents", "l0", "fvu", "selected", and optionally "rejected": True
    for one the selection ruled out whatever its neighbours, and "l0_ci95", "fvu_ci95": the 95%
    intervals' half widths of a grid point drawn at its seed means} per finished SAE or grid point;
    `baselines`: {"kind", "k", "l0", "fvu"} per baseline dictionary; `band`: the selection's L0 band.
    """
    figure = Figure(figsize=(10, 5.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    curves: dict[tuple[str, int], list[dict]] = {}
    for sae in saes:
        curves.setdefault((sae["architecture"], sae["n_latents"]), []).append(sae)
    colors = [f"C{i % 10}" for i in range(len(curves))]
    for color, ((architecture, n_latents), points) in zip(colors, sorted(curves.items())):
        candidates = [p for p in points if not p.get("rejected")]
        rejected = [p for p in points if p.get("rejected")]
        axes.plot([p["l0"] for p in candidates], [p["fvu"] for p in candidates], "o", color=color, markersize=4)
        axes.plot(
            [p["l0"] for p in rejected],
            [p["fvu"] for p in rejected],
            "o",
            color=color,
            markersize=6,
            markerfacecolor="none",
        )
        spread = [p for p in points if p.get("fvu_ci95") is not None]  # a grid point's seeds: 95% t-intervals
        if spread:
            axes.errorbar(
                [p["l0"] for p in spread],
                [p["fvu"] for p in spread],
                xerr=[interval(p.get("l0_ci95")) for p in spread],
                yerr=[interval(p["fvu_ci95"]) for p in spread],
                fmt="none",
                ecolor=color,
                elinewidth=1,
                capsize=3,
            )
        best = pareto_front({i: (p["l0"], p["fvu"]) for i, p in enumerate(points)})
        front = sorted((points[i] for i in best), key=lambda point: (point["l0"], point["fvu"]))
        axes.plot(
            [p["l0"] for p in front],
            [p["fvu"] for p in front],
            "o-",
            color=color,
            markersize=4,
            label=f"{architecture} n={n_latents}",
        )
        chosen = [p for p in points if p["selected"]]
        axes.scatter(
            [p["l0"] for p in chosen],
            [p["fvu"] for p in chosen],
            s=110,
            facecolors="none",
            edgecolors=color,
            linewidths=1.5,
        )
    top = 1.05 * max([1.0] + [p["fvu"] for p in saes])
    kinds: dict[str, list[dict]] = {}
    for baseline in baselines:
        kinds.setdefault(baseline["kind"], []).append(baseline)
    for kind, points in sorted(kinds.items()):
        points = sorted(points, key=lambda point: point["l0"])
        marker, color = BASELINE_STYLES.get(kind, ("v", "0.3"))
        shown = [min(p["fvu"], top) for p in points]
        axes.plot(
            [p["l0"] for p in points], shown, ":", color=color, marker=marker, markersize=7, label=f"baseline: {kind}"
        )
        for point in points:
            if point["fvu"] > top:
                axes.plot([point["l0"]], [top], "^", color=color, markersize=9, clip_on=False)
                axes.annotate(
                    f"{kind} {point['fvu']:.3g}",
                    (point["l0"], top),
                    textcoords="offset points",
                    xytext=(6, -12),
                    fontsize=7,
                    color=color,
                )
    l0s = [p["l0"] for p in saes + baselines if p["l0"] > 0]
    if l0s and max(l0s) / min(l0s) > 20:
        axes.set_xscale("log")
    if saes and any(p["selected"] for p in saes):
        axes.scatter([], [], s=110, facecolors="none", edgecolors="black", label="selected")
    if any(p.get("fvu_ci95") is not None for p in saes):
        axes.errorbar([], [], xerr=[], yerr=[], fmt="none", ecolor="0.3", capsize=3, label="seed mean, 95% t-interval")
    if any(p.get("rejected") for p in saes):
        axes.plot([], [], "o", color="0.3", markersize=6, markerfacecolor="none", label="rejected (band or bounds)")
    if band is not None:
        axes.axvspan(band[0], band[1], color="tab:green", alpha=0.08, label=f"L0 band [{band[0]:.3g}, {band[1]:.3g}]")
    axes.set_xlabel("L0 (mean active latents per token, eval)")
    axes.set_ylabel("FVU (fraction of variance unexplained, eval)")
    axes.set_ylim(0, top)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the data, never on it
    axes.set_title(title or "sparsity against reconstruction")
    figure.tight_layout()
    return figure
