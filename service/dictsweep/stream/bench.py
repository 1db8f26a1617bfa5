"""`dictsweep bench stream`: how fast the readers move a dataset, against the store's line rate.

In one run over the same shards: (1) a plain concurrent GET of the objects (threads, no checks:
what the store can deliver), (2) the reader actors fetching, verifying (sha256, rows) and decoding
them concurrently, and (3) the whole stream as trainers see it: a broadcaster's shuffled batches
for one pass over the data.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset


def plain_get(dataset: ActivationDataset, concurrency: int) -> tuple[int, float]:
    """Bytes and seconds of fetching every train shard with `concurrency` threads."""
    uris = [dataset.shard_uri(info) for info in dataset.shards("train")]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        total = sum(len(data) for data in pool.map(fs.read_bytes, uris))
    return total, time.perf_counter() - start


def bench_stream(uri: str, readers: int = 4, batch_rows: int = 4096, shuffle_shards: int = 4,
                 in_flight: int = 8) -> dict:
    """Measure one dataset; returns the JSON-ready result."""
    import ray

    from dictsweep.cluster import start_ray
    from dictsweep.stream.actors import Broadcaster, ShardReader

    dataset = ActivationDataset.open(uri)
    shards = dataset.shards("train")
    start_ray(None)
    pool = [ShardReader.remote(uri) for _ in range(readers)]
    ray.get([reader.stats.remote() for reader in pool])  # started before the clock runs
    plain_get(dataset, readers)  # warm the connections and the store's cache alike for both

    total_bytes, get_seconds = plain_get(dataset, readers)
    start = time.perf_counter()
    refs = [pool[index % readers].read.remote(index) for index in range(len(shards))]
    rows = sum(len(rows) for rows in ray.get(refs))
    read_seconds = time.perf_counter() - start
    for actor in pool:  # the broadcaster starts readers of its own
        ray.kill(actor)

    broadcaster = Broadcaster.remote(uri, batch_rows, shuffle_shards, 0, readers)
    steps = sum(info.rows for info in shards) // batch_rows
    ray.get(broadcaster.stats.remote())
    start = time.perf_counter()
    pending = []
    for step in range(steps):  # a bounded window of batches in flight, as the driver keeps
        pending.append(broadcaster.batch.remote(step))
        if len(pending) >= in_flight:
            ray.get(pending.pop(0))
    ray.get(pending)
    stream_seconds = time.perf_counter() - start
    ray.kill(broadcaster)

    megabytes = total_bytes / 1e6
    return {
        "uri": uri, "shards": len(shards), "bytes": total_bytes, "rows": rows, "readers": readers,
        "get_mb_per_s": megabytes / get_seconds,
        "reader_mb_per_s": megabytes / read_seconds, "reader_rows_per_s": rows / read_seconds,
        "reader_fraction_of_get": get_seconds / read_seconds,
        "stream_rows_per_s": steps * batch_rows / stream_seconds,
        "stream_mb_per_s": steps * batch_rows * dataset.d_model * dataset.torch_dtype.itemsize / 1e6 / stream_seconds,
    }
