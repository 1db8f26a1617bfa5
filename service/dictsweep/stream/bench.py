"""`dictsweep bench stream`: how fast the readers and the stream move a dataset, against the store.

In one run over the same shards: (1) a plain concurrent GET of the objects (threads, no checks:
what the store can deliver, at the readers' concurrency), (2) the readers producing every window
of one pass (fetch, verify, decode, shuffle, into the object store; with their CPU time per byte,
which the machine's other load does not change), and (3) the stream as trainers see it: N
consumer actors on this node each taking every batch of one pass, as N GPUs would, copying its
rows into a staging buffer of their own (as a trainer's host-to-device copy does), with the driver
handing out window pieces under the same budget a sweep uses, and the object store's peak.
(1) and (2) each run once untimed first, so both meet warm caches and warm memory, as a long
sweep does after its first windows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray

from dictsweep.store import fs
from dictsweep.store.dataset import ActivationDataset
from dictsweep.stream.actors import NUMPY_DTYPES, BatchPieces, batch_views, peak_rss_mb


def plain_get(dataset: ActivationDataset, concurrency: int) -> tuple[int, float]:
    """Bytes and seconds of fetching every train shard with `concurrency` threads."""
    uris = [dataset.shard_uri(info) for info in dataset.shards("train")]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        total = sum(len(data) for data in pool.map(fs.read_bytes, uris))
    return total, time.perf_counter() - start


def read_pass(pool: list, order, windows: int) -> float:
    """Seconds for the readers to put every window of epoch 0 in the object store, at most
    `windows` (or one per reader) in flight."""
    start, pending = time.perf_counter(), deque()
    for position in range(order.windows_per_epoch):
        pending.append(pool[position % len(pool)].window.remote("train", position))
        if len(pending) >= max(windows, len(pool)):
            ray.wait([pending[0]], fetch_local=False)
            pending.popleft()
    ray.wait(list(pending), num_returns=len(pending), fetch_local=False)
    return time.perf_counter() - start


class StoreWatch:
    """The most bytes the node's object store held while it ran (sampled every `interval` s)."""

    def __init__(self, interval: float = 0.02):
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)  # this cluster, not another
        self.used = lambda: get_memory_info_reply(state).store_stats.object_store_bytes_used
        deadline = time.monotonic() + 10
        while self.used() > 1e6 and time.monotonic() < deadline:
            time.sleep(0.05)  # windows of the readers' pass are freed asynchronously: not this stream's
        self.interval, self.peak, self.stopped = interval, self.used(), threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        while not self.stopped.wait(self.interval):
            self.peak = max(self.peak, self.used())

    def stop(self) -> int:
        self.stopped.set()
        self.thread.join()
        return max(self.peak, self.used())


@ray.remote(num_cpus=0)
class Consumer:
    """A trainer stand-in: takes batches as window pieces and copies their rows into its own buffer."""

    def __init__(self, batch_rows: int, d_model: int, dtype: str):
        self.staging = np.empty((batch_rows, d_model), NUMPY_DTYPES[dtype])  # [batch_rows, d_model]
        self.rows = 0

    def step(self, index: int, pieces: BatchPieces) -> int:
        row = 0
        for view in batch_views(pieces):
            self.staging[row : row + len(view)] = view
            row += len(view)
        self.rows += row
        return index

    def stats(self) -> dict:
        return {"rows": self.rows, "peak_rss_mb": peak_rss_mb()}


def bench_stream(
    uri: str,
    readers: int = 2,
    batch_rows: int = 4096,
    shuffle_shards: int = 4,
    consumers: int = 1,
    windows: int = 3,
    in_flight: int = 8,
) -> dict:
    """Measure one dataset; returns the JSON-ready result."""
    from dictsweep.stream.actors import WindowReader, stream_orders
    from dictsweep.stream.windows import WindowStream
    from dictsweep.cluster import start_ray

    dataset = ActivationDataset.open(uri)
    shards = dataset.shards("train")
    order = stream_orders(dataset, batch_rows, shuffle_shards, 0)["train"]
    start_ray(None)
    pool = [WindowReader.remote(uri, batch_rows, shuffle_shards, 0) for _ in range(readers)]
    ray.get([reader.stats.remote() for reader in pool])  # started before the clock runs
    concurrency = min(len(shards), readers * shuffle_shards)  # as many GETs at once as the readers make
    plain_get(dataset, concurrency)  # warm the connections and the store's cache alike for both

    total_bytes, get_seconds = plain_get(dataset, concurrency)
    read_pass(pool, order, windows)  # likewise: the object store's pages and the readers' buffers warm
    before = ray.get([reader.stats.remote() for reader in pool])
    read_seconds = read_pass(pool, order, windows)  # every window once, at most `windows` held
    after = ray.get([reader.stats.remote() for reader in pool])
    read_bytes = sum(stats["bytes_read"] for stats in after) - sum(stats["bytes_read"] for stats in before)
    read_cpu = sum(stats["cpu_seconds"] for stats in after) - sum(stats["cpu_seconds"] for stats in before)
    read_faults = sum(stats["major_faults"] for stats in after) - sum(stats["major_faults"] for stats in before)
    rows = sum(window.rows for window in order.windows(0))

    steps = order.epoch_rows // batch_rows
    team = [Consumer.remote(batch_rows, dataset.d_model, dataset.dtype) for _ in range(consumers)]
    ray.get([consumer.stats.remote() for consumer in team])
    stream = WindowStream(pool, order, "train", steps, windows)
    store = StoreWatch()
    start = time.perf_counter()
    cursors, queues, finished = [0] * consumers, [deque() for _ in team], [0.0] * consumers
    while any(queues) or min(cursors) < steps:
        for number, consumer in enumerate(team):  # each consumer at most `in_flight` batches ahead
            while cursors[number] < steps and len(queues[number]) < in_flight:
                pieces = stream.pieces(cursors[number])
                if pieces is None:
                    break  # beyond the window budget: wait for the slowest consumer
                queues[number].append(consumer.step.remote(cursors[number], pieces))
                cursors[number] += 1
        ray.wait([queue[0] for queue in queues if queue], num_returns=1)
        for number, queue in enumerate(queues):
            while queue and ray.wait([queue[0]], timeout=0)[0]:
                ray.get(queue.popleft())
                if not queue and cursors[number] == steps:
                    finished[number] = time.perf_counter() - start
        stream.advance(min(cursor - len(queue) for cursor, queue in zip(cursors, queues)))
    stream.close()
    store_peak = store.stop()
    reader_stats = ray.get([reader.stats.remote() for reader in pool])
    consumer_stats = ray.get([consumer.stats.remote() for consumer in team])
    for actor in pool + team:
        ray.kill(actor)

    megabytes, row_bytes = total_bytes / 1e6, dataset.d_model * np.dtype(NUMPY_DTYPES[dataset.dtype]).itemsize
    per_consumer = [steps * batch_rows / seconds for seconds in finished]
    return {
        "uri": uri,
        "shards": len(shards),
        "bytes": total_bytes,
        "rows": rows,
        "readers": readers,
        "consumers": consumers,
        "batch_rows": batch_rows,
        "shuffle_shards": shuffle_shards,
        "windows_per_node": windows,
        "get_concurrency": concurrency,
        "get_mb_per_s": megabytes / get_seconds,
        "reader_mb_per_s": read_bytes / 1e6 / read_seconds,
        "reader_rows_per_s": rows / read_seconds,
        "reader_fraction_of_get": (read_bytes / 1e6 / read_seconds) / (megabytes / get_seconds),
        "reader_cpu_ns_per_byte": read_cpu / read_bytes * 1e9,
        "reader_major_faults": read_faults,
        "stream_rows_per_s": min(per_consumer),
        "stream_mb_per_s": min(per_consumer) * row_bytes / 1e6,
        "consumer_rows_per_s": per_consumer,
        "consumer_rows": [stats["rows"] for stats in consumer_stats],
        "windows_read": stream.requested,
        "most_windows_held": stream.most_held,
        "window_mb": max(window.rows for window in order.windows(0)) * row_bytes / 1e6,
        "object_store_peak_mb": store_peak / 1e6,
        "reader_peak_rss_mb": max(stats["peak_rss_mb"] for stats in reader_stats),
        "consumer_peak_rss_mb": max(stats["peak_rss_mb"] for stats in consumer_stats),
    }
