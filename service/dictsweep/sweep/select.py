"""Selection: per dictionary size, among the dictionaries inside the L0 band and the quality bounds
(`select:` of the spec), the best by the chosen metric, or the Pareto front of (eval L0, metric).

Every SAE gets a short reason, selected or not, for index.json, the MLflow tags and the table.
"""

from __future__ import annotations

from typing import NamedTuple

from dictsweep.config import SelectConfig

HIGHER_IS_BETTER = {"fvu": False, "loss_recovered": True}


class Choice(NamedTuple):
    """Whether one SAE is selected, and why (or why not) in a few words; `eligible` False when it
    was ruled out whatever its neighbours (outside the band or a bound, or unmeasured)."""

    selected: bool
    why: str
    eligible: bool = True


def pareto_front(scores: dict[str, tuple[float, float]]) -> set[str]:
    """Names whose (l0, fvu) no other point beats in both (at least as good, better in one)."""
    front = set()
    for name, (l0, fvu) in scores.items():
        dominated = any(
            other_l0 <= l0 and other_fvu <= fvu and (other_l0, other_fvu) != (l0, fvu)
            for other, (other_l0, other_fvu) in scores.items()
            if other != name
        )
        if not dominated:
            front.add(name)
    return front


def number(value: float) -> str:
    """A metric as people read it: 3 significant digits, whole numbers from 100 up (no exponent)."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def rejection(metrics: dict, config: SelectConfig, band: tuple[float, float]) -> str | None:
    """Why a dictionary cannot be selected whatever its neighbours are; None when it can."""
    low, high = band
    for key in ("l0", "fvu", config.metric):
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or value != value:  # missing or NaN
            return f"no {key} measured"
    l0, fvu = metrics["l0"], metrics["fvu"]
    if l0 > high:
        return f"L0 {number(l0)} above band {number(high)}"
    if l0 < low:
        return f"L0 {number(l0)} below band {number(low)}"
    if fvu >= config.max_fvu:
        return f"fvu {number(fvu)} >= max_fvu {number(config.max_fvu)}"
    dead = metrics.get("dead_fraction", 0.0)
    if dead > config.max_dead_fraction:
        return f"dead {number(dead)} > max_dead_fraction {number(config.max_dead_fraction)}"
    return None


def select(results: dict[str, dict], config: SelectConfig, d_model: int) -> dict[str, Choice]:
    """A `Choice` for every SAE of `results` (name -> {"n_latents": int, "metrics": {"l0", "fvu",
    "dead_fraction", and "loss_recovered" when ranking by it}}).

    Per size, the eligible ones (see `rejection`) compete: `best` keeps the one with the best
    metric (ties: the lower L0, then the name), `front` keeps every point that no other eligible
    point of its size beats on both L0 and the metric.
    """
    band = config.l0_band(d_model)
    band_text = f"L0 [{number(band[0])}, {number(band[1])}]"
    sign = -1.0 if HIGHER_IS_BETTER[config.metric] else 1.0  # scores: lower is better
    choices: dict[str, Choice] = {}
    eligible: dict[int, dict[str, tuple[float, float]]] = {}  # size -> name -> (l0, signed metric)
    for name, result in results.items():
        why = rejection(result["metrics"], config, band)
        if why is not None:
            choices[name] = Choice(False, why, eligible=False)
        else:
            metrics = result["metrics"]
            eligible.setdefault(result["n_latents"], {})[name] = (metrics["l0"], sign * metrics[config.metric])
    for size, scores in eligible.items():
        count = f"{len(scores)} eligible" if len(scores) > 1 else "the only one eligible"
        if config.per_size == "best":
            best = min(scores, key=lambda name: (scores[name][1], scores[name][0], name))
            best_value = sign * scores[best][1]
            for name, (_, score) in scores.items():
                value = sign * score
                choices[name] = (
                    Choice(True, f"best {config.metric} {number(value)} of n={size} inside {band_text} ({count})")
                    if name == best
                    else Choice(
                        False,
                        f"{config.metric} {number(value)}: n={size}'s best inside "
                        f"{band_text} is {number(best_value)} ({best})",
                    )
                )
        else:
            front = pareto_front(scores)
            for name, (l0, score) in scores.items():
                if name in front:
                    choices[name] = Choice(True, f"on n={size}'s (L0, {config.metric}) front inside {band_text}")
                    continue
                rival = min(
                    (other for other in front if scores[other][0] <= l0 and scores[other][1] <= score),
                    key=lambda other: (scores[other][1], other),
                )
                choices[name] = Choice(
                    False,
                    f"beaten by {rival} (L0 {number(scores[rival][0])}, {config.metric} "
                    f"{number(sign * scores[rival][1])}) on n={size}'s front",
                )
    return choices


def selected_names(choices: dict[str, Choice]) -> set[str]:
    """The names a selection kept."""
    return {name for name, choice in choices.items() if choice.selected}
