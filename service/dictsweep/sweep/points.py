"""Training-curve points in the sweep's storage: written by the driver as it takes them from a
trainer, before they are queued for MLflow, so that a driver that dies loses none of them.

One file per trainer and logging point, `<run>/points/<trainer>/<tokens>.json` holding
{SAE name: {metric: value}}: written whole (object stores cannot append), and a step a restarted
trainer repeats writes the same file again. `--resume` reads them all and sends MLflow what it lacks.
"""

from __future__ import annotations

import json

from dictsweep.store import fs


def store_points(run_dir: str, trainer: str, records: list[dict]) -> None:
    """Write `records` ({"name", "tokens", "metrics"}) of one trainer, a file per logging point."""
    by_tokens: dict[int, dict[str, dict]] = {}
    for record in records:
        by_tokens.setdefault(record["tokens"], {})[record["name"]] = record["metrics"]
    for tokens, metrics in sorted(by_tokens.items()):
        fs.write_text(fs.join(run_dir, "points", trainer, f"{tokens:015d}.json"), json.dumps(metrics))


def stored_points(run_dir: str) -> dict[str, dict[int, dict[str, float]]]:
    """Every stored point: SAE name -> tokens -> {metric: value}."""
    points: dict[str, dict[int, dict[str, float]]] = {}
    for uri in fs.list_files(fs.join(run_dir, "points")):
        name = uri.rsplit("/", 1)[-1]
        if not (name.endswith(".json") and name.removesuffix(".json").isdigit()):
            continue  # a write the dead driver did not finish
        tokens = int(name.removesuffix(".json"))
        for name, metrics in json.loads(fs.read_text(uri)).items():
            points.setdefault(name, {})[tokens] = metrics
    return points
