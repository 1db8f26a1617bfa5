"""What a trainer reports of its own work (`DeviceLoop.usage`): its ensembles with the kernel and
decoder they step with, its data wait, and on a CPU no GPU reading at all (a note, never a zero)."""

import pytest
import torch

from dictsweep.train.device import DeviceLoop
from dictsweep.train.usage import DeviceUsage
from tests.train.test_device import CONFIG, D_MODEL, ROWS, SPECS, STEPS, loop, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_usage_names_the_ensembles_and_reads_no_gpu_on_a_cpu():
    device_loop = loop()
    train(device_loop, 0, STEPS, "prefetched")
    usage = device_loop.usage()
    assert usage["ensembles"] == [
        {
            "architecture": "topk",
            "d_model": 16,
            "d_target": 0,
            "n_latents": 64,
            "members": 2,
            "k": 6,
            "batch_rows": ROWS,
            "kernel": "bmm",
            "decode": "sparse",
            "encode": "auto",  # the kernel was set: nothing measured, the top-k family's default
        },
        {
            "architecture": "relu",
            "d_model": 16,
            "d_target": 0,
            "n_latents": 32,
            "members": 1,
            "k": 0,
            "batch_rows": ROWS,
            "kernel": "bmm",
            "decode": "sparse",
            "encode": "auto",
        },
    ]
    assert {
        key: usage[key] for key in ("busy_seconds", "wait_seconds", "data_wait_fraction")
    } == device_loop.data_wait()
    assert usage["busy_seconds"] > 0 and 0 <= usage["data_wait_fraction"] < 1
    assert usage["device"] == "cpu"
    assert usage["gpu_busy_seconds"] is None and usage["gpu_utilization"] is None
    assert usage["gpu_note"] == "no GPU: the trainer ran on the CPU"


def test_cpu_usage_touches_no_cuda(monkeypatch):
    """A CPU trainer never calls into torch.cuda (a process without a GPU may have no driver)."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.cuda called on a CPU trainer")

    monkeypatch.setattr(torch.cuda, "Event", refuse)
    monkeypatch.setattr(torch.cuda, "utilization", refuse)
    usage = DeviceUsage(torch.device("cpu"))
    for _ in range(3):
        usage.end(usage.begin())
    assert usage.report() == {
        "gpu_busy_seconds": None,
        "gpu_utilization": None,
        "gpu_note": "no GPU: the trainer ran on the CPU",
    }


def test_writing_checkpoints_is_not_waiting_for_data(tmp_path):
    """Batches handed over back to back: the trainer never waits for data, however long its
    checkpoints take to write (they were once counted as data wait, the time before the next step)."""
    device_loop = DeviceLoop(
        SPECS,
        D_MODEL,
        CONFIG.model_copy(update={"checkpoint_every_tokens": ROWS}),
        STEPS,
        1.5,
        "float32",
        "cpu",
        str(tmp_path / "trainer.pt"),
    )
    train(device_loop, 0, STEPS, "whole")
    usage = device_loop.usage()
    assert usage["checkpoint_seconds"] > 0
    assert usage["wait_seconds"] < usage["checkpoint_seconds"] / 4
