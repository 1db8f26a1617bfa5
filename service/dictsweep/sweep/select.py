"""Selection: per dictionary size, the Pareto front of (eval L0, eval FVU), both lower is better."""

from __future__ import annotations


def pareto_front(scores: dict[str, tuple[float, float]]) -> set[str]:
    """Names whose (l0, fvu) no other point beats in both (at least as good, better in one)."""
    front = set()
    for name, (l0, fvu) in scores.items():
        dominated = any(other_l0 <= l0 and other_fvu <= fvu and (other_l0, other_fvu) != (l0, fvu)
                        for other, (other_l0, other_fvu) in scores.items() if other != name)
        if not dominated:
            front.add(name)
    return front


def select(results: dict[str, dict]) -> set[str]:
    """Selected points: the union of each dictionary size's Pareto front.

    `results` maps a point name to {"n_latents": int, "metrics": {"l0": ..., "fvu": ...}}.
    """
    by_size: dict[int, dict[str, tuple[float, float]]] = {}
    for name, result in results.items():
        metrics = result["metrics"]
        by_size.setdefault(result["n_latents"], {})[name] = (metrics["l0"], metrics["fvu"])
    return set().union(*(pareto_front(scores) for scores in by_size.values())) if by_size else set()
