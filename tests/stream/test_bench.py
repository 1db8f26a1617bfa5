"""`dictsweep bench stream` measures the readers and the stream over every byte of the dataset, from
the S3 server as production reads S3."""

import pytest

from dictsweep.store.dataset import ActivationDataset
from dictsweep.store.synth import SynthConfig, synth_dataset
from dictsweep.stream.bench import bench_stream


def test_bench_stream_reads_every_shard_from_s3(bucket, ray_local):
    uri = f"s3://{bucket}/toy"
    synth_dataset(uri, SynthConfig(d_model=16, n_features=32, active=3, rows=8192, eval_rows=1024, shard_rows=1024))
    result = bench_stream(uri, readers=2, batch_rows=512, shuffle_shards=2, consumers=2, windows=2)
    dataset = ActivationDataset.open(uri)
    assert result["shards"] == 8 and result["rows"] == 8192
    assert result["bytes"] == sum(info.bytes for info in dataset.shards("train"))
    for key in ("get_mb_per_s", "reader_mb_per_s", "stream_rows_per_s", "stream_mb_per_s"):
        assert result[key] > 0
    assert result["reader_fraction_of_get"] == pytest.approx(result["reader_mb_per_s"] / result["get_mb_per_s"])
    # every consumer took every batch; the stream is as fast as the slowest; each window read once
    assert len(result["consumer_rows_per_s"]) == 2
    assert result["stream_rows_per_s"] == min(result["consumer_rows_per_s"])
    assert result["consumer_rows"] == [8192, 8192]
    assert result["windows_read"] == 4
    assert result["most_windows_held"] <= 2  # the budget: no batch spans windows here
    assert result["reader_cpu_ns_per_byte"] > 0 and isinstance(result["reader_major_faults"], int)
