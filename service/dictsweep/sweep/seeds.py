"""Seeds: a grid point trained with several seeds is judged by its mean over seeds, with a confidence
interval, and by how stable its features are from seed to seed.

- Interval: Student's t at 95% over the seeds, mean +- t(0.975, n - 1) s / sqrt(n) with s the sample
  standard deviation (none for one seed).
- Stability: the mean max cosine of decoder rows between two seeds' dictionaries (each row's best
  cosine with the other's rows, averaged over both dictionaries' rows), averaged over seed pairs.
- Selection ranks the grid points by their seed means (`sweep.select` on one record per point);
  every seed of a selected point is selected and exported, each with the point's reason, so that a
  selected point's spread stays inspectable.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np

from dictsweep.config import SelectConfig
from dictsweep.sweep.select import Choice, number, select
from dictsweep.track_views import EVAL_STEP

# t(0.975, df) for df = 1 .. 30; beyond, the Cornish-Fisher expansion about the normal quantile
T_975 = (12.7062, 4.30265, 3.18245, 2.77645, 2.57058, 2.44691, 2.36462, 2.306, 2.26216, 2.22814, 2.20099, 2.17881)
T_975 += (2.16037, 2.14479, 2.13145, 2.11991, 2.10982, 2.10092, 2.09302, 2.08596, 2.07961, 2.07387, 2.06866, 2.0639)
T_975 += (2.05954, 2.05553, 2.05183, 2.04841, 2.04523, 2.04227)
Z_975 = 1.959963984540054
SUMMARISED = ("l0", "fvu", "dead_fraction", "loss_recovered", "explained_variance", "cossim", "l2_ratio")
SUMMARISED += ("kl_div_score", "ce_loss_score", "sae_top_1_test_accuracy", "mean_absorption_fraction_score")


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        return math.nan
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def interval(values: list[float]) -> dict[str, float]:
    """Mean, 95% t-interval half width and bounds, and count of `values` (the half width nan for one)."""
    n = len(values)
    mean = float(np.mean(values))
    half = t_quantile(n - 1) * float(np.std(values, ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "half_width": half, "low": mean - half, "high": mean + half, "n": n}


def point_key(point) -> str:
    """A grid point's name without its seed: what its seeds share."""
    return replace(point, seed=0).name.rsplit("-s", 1)[0]


def seed_groups(points: dict) -> dict[str, list[str]]:
    """Grid point (name without seed) -> the names of its finished SAEs, by seed; `points`: name -> GridPoint."""
    groups: dict[str, list[str]] = {}
    for name, point in sorted(points.items(), key=lambda item: (point_key(item[1]), item[1].seed)):
        groups.setdefault(point_key(point), []).append(name)
    return groups


def summarise(groups: dict[str, list[str]], metrics: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Per grid point, per metric that all its seeds have (`SUMMARISED`): `interval` over its seeds."""
    summary = {}
    for group, names in groups.items():
        summary[group] = {
            key: interval([float(metrics[name][key]) for name in names])
            for key in SUMMARISED
            if all(isinstance(metrics[name].get(key), (int, float)) for name in names)
        }
    return summary


def stability(decoders: list) -> float:
    """Mean max cosine of decoder rows between seeds (see the module doc); nan for one seed."""
    from dictsweep.sae.metrics import mmcs

    pairs = [np.mean(mmcs(a, b)) for a, b in itertools.combinations(decoders, 2)]
    return float(np.mean(pairs)) if pairs else math.nan


def select_over_seeds(
    results: dict[str, dict], groups: dict[str, list[str]], config: SelectConfig, d_model: int
) -> dict[str, Choice]:
    """`select` over grid points by their seed means (every seed of a point shares its choice); with one
    seed per point, exactly `select` over the SAEs."""
    if all(len(names) == 1 for names in groups.values()):
        return select(results, config, d_model)
    summary = summarise(groups, {name: result["metrics"] for name, result in results.items()})
    means = {
        group: {
            "n_latents": results[names[0]]["n_latents"],
            "metrics": {key: value["mean"] for key, value in summary[group].items()},
        }
        for group, names in groups.items()
    }
    choices = {}
    for group, choice in select(means, config, d_model).items():
        count = len(groups[group])
        why = f"{choice.why} (mean of {count} seeds)" if count > 1 else choice.why
        for name in groups[group]:
            choices[name] = Choice(choice.selected, why, choice.eligible)
    return choices


def seed_rows(summary: dict[str, dict[str, dict]], stable: dict[str, float]) -> list[dict]:
    """One row per grid point of several seeds: n, stability, and each metric's mean and 95% interval
    (`saes_seeds.csv` on the sweep's run, and the results table's seed lines)."""
    rows = []
    for group, metrics in sorted(summary.items()):
        n = max((value["n"] for value in metrics.values()), default=1)
        if n < 2:
            continue
        row = {"point": group, "seeds": n, "feature_stability": stable.get(group, math.nan)}
        for key, value in metrics.items():
            row[key] = value["mean"]
            row[f"{key}_ci95"] = value["half_width"]
        rows.append(row)
    return rows


def describe(row: dict) -> str:
    """One grid point over its seeds in a line: `fvu 0.12 +- 0.01, l0 30.1 +- 2.2, stability 0.91`."""
    parts = [
        f"{key} {number(row[key])} +- {number(row[f'{key}_ci95'])}"
        for key in ("fvu", "l0", "loss_recovered", "sae_top_1_test_accuracy")
        if key in row
    ]
    return f"{row['point']} ({row['seeds']} seeds, 95% t-interval): " + ", ".join(
        parts + [f"feature stability {number(row['feature_stability'])}"]
    )


def seed_report(driver, groups: dict[str, list[str]]) -> list[dict]:
    """The sweep's grid points of several seeds: each seed's run gets the point's `feature_stability`
    and every summarised metric's `<key>_seed_mean` and `<key>_seed_ci95` (also in index.json and
    saes.csv); the sweep's run gets `saes_seeds.csv`; returns `seed_rows`."""
    import csv
    import io

    from dictsweep import load_dictionary

    result, tracker = driver.ledger.result, driver.ledger.tracker
    several = {group: names for group, names in groups.items() if len(names) > 1}
    if not several:
        return []
    summary = summarise(several, {name: result.finished[name].metrics for names in several.values() for name in names})
    stable = {
        group: stability([load_dictionary(result.finished[name].uri).W_dec for name in names])
        for group, names in several.items()
    }
    for group, names in several.items():
        extra = {"feature_stability": stable[group]}
        for key, value in summary[group].items():
            extra[f"{key}_seed_mean"], extra[f"{key}_seed_ci95"] = value["mean"], value["half_width"]
        for name in names:
            result.finished[name].metrics.update(extra)
            tracker.log_metrics(result.finished[name].run_id, {f"eval/{k}": v for k, v in extra.items()}, EVAL_STEP)
    rows = seed_rows(summary, stable)
    text = io.StringIO()
    writer = csv.DictWriter(
        text, fieldnames=sorted({key for row in rows for key in row}, key=lambda k: (k != "point", k))
    )
    writer.writeheader()
    writer.writerows(rows)
    tracker.log_bytes(tracker.parent_id, text.getvalue().encode(), "saes_seeds.csv")
    return rows


def plot_points(result, groups: dict[str, list[str]]) -> list[dict]:
    """The Pareto plot's SAEs: one point per grid point at its seed means, with its 95% intervals
    (`l0_ci95`, `fvu_ci95`) where it has several seeds."""
    points = []
    for names in groups.values():
        first = result.finished[names[0]]
        metrics = first.metrics
        several = len(names) > 1 and "fvu_seed_mean" in metrics
        points.append(
            {
                **first.point.params(),
                "l0": metrics["l0_seed_mean"] if several else metrics["l0"],
                "fvu": metrics["fvu_seed_mean"] if several else metrics["fvu"],
                "l0_ci95": metrics.get("l0_seed_ci95") if several else None,
                "fvu_ci95": metrics.get("fvu_seed_ci95") if several else None,
                "selected": names[0] in result.selected,
                "rejected": names[0] in result.ruled_out,
            }
        )
    return points
