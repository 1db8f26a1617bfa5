"""The trainer actor (a thin Ray shell over `DeviceLoop`) on a real local Ray cluster: batches as
object-store window pieces `(window, start, stop)` with `upcoming`, as the stream hands them over,
train exactly as whole arrays do."""

import numpy as np
import pytest

from dictsweep.config import TrainConfig
from dictsweep.sae import Member
from dictsweep.train.actor import Trainer
from dictsweep.train.device import EnsembleSpec

D_MODEL, ROWS, STEPS, WINDOW = 16, 32, 6, 40
CONFIG = TrainConfig(
    tokens=ROWS * STEPS, batch_rows=ROWS, log_every_tokens=ROWS * 3, eval_tokens=ROWS, kernel="bmm", decode="sparse"
)
SPECS = [EnsembleSpec("topk", 64, (Member(lr=3e-3, seed=1, k=4),), ("a",))]


def test_window_pieces_train_as_whole_batches(ray_local, tmp_path):
    ray = ray_local
    data = np.random.default_rng(0).standard_normal((ROWS * STEPS, D_MODEL)).astype(np.float16)
    windows = [ray.put(data[start : start + WINDOW]) for start in range(0, len(data), WINDOW)]

    def pieces(index):
        if index >= STEPS:
            return None
        start, stop, out = index * ROWS, (index + 1) * ROWS, []
        for number, window in enumerate(windows):
            low, high = max(start, number * WINDOW), min(stop, (number + 1) * WINDOW)
            if low < high:
                out.append((window, low - number * WINDOW, high - number * WINDOW))
        return out

    remote = ray.remote(num_cpus=0)(Trainer)
    by_pieces, whole = (remote.remote(SPECS, D_MODEL, CONFIG, STEPS, 1.0, "float16", "cpu", 1, None) for _ in range(2))
    logged = {"pieces": [], "whole": []}
    for index in range(STEPS):
        logged["pieces"] += ray.get(by_pieces.step.remote(index, pieces(index), pieces(index + 1)))
        logged["whole"] += ray.get(whole.step.remote(index, data[index * ROWS : (index + 1) * ROWS]))
    assert logged["pieces"] == logged["whole"] and len(logged["whole"]) == 2
    ray.get(by_pieces.eval_step.remote(0, pieces(0)))
    ray.get(whole.eval_step.remote(0, data[:ROWS]))
    results = [
        ray.get(actor.finish.remote(str(tmp_path / name), {"a": {}}, None))
        for name, actor in (("pieces", by_pieces), ("whole", whole))
    ]
    assert results[0]["finished"]["a"]["metrics"] == pytest.approx(results[1]["finished"]["a"]["metrics"], rel=0, abs=0)
    assert ray.get(by_pieces.data_wait.remote())["busy_seconds"] > 0
