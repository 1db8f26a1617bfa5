"""`--plan-only` without Ray: the local machine (or the spec) settles the devices, and nothing is
started or written."""

import os
import subprocess
import sys

import yaml

# the plan is made in a fresh process: this test session may hold a Ray cluster of its own already
PLAN = """
import sys, ray
from dictsweep import cli
sys.argv = ["dictsweep", "run", sys.argv[1], "--plan-only"]
try:
    cli.main()
    code = 0
except SystemExit as exit:
    code = exit.code or 0
print("exit", code, "ray started", ray.is_initialized())
"""


def plan_only(spec_path: str) -> tuple[int, str, bool]:
    """(exit code, what it printed, whether Ray was started) of `dictsweep run SPEC --plan-only`."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", PLAN, spec_path], capture_output=True, text=True, env=env, timeout=300)
    printed = done.stdout + done.stderr
    last = [line for line in done.stdout.splitlines() if line.startswith("exit ")][-1].split()
    return int(last[1]), printed, last[-1] == "True"


def write_spec(tmp_path, **resources) -> str:
    spec = {
        "name": "planonly",
        "data": {"uri": str(tmp_path / "data"), "synth": {"d_model": 48, "rows": 4096}},
        "grid": {"architecture": ["relu", "topk"], "n_latents": [64, 128], "k": [4]},
        "storage": {"dir": str(tmp_path / "sweeps")},
        "resources": resources,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_plan_only_uses_the_local_machine_without_ray(tmp_path):
    code, printed, ray_started = plan_only(write_spec(tmp_path))  # device auto: this machine decides
    assert code == 0, printed
    assert "d_model=48" in printed and "cpu:0" in printed and "4 SAEs" in printed
    assert not ray_started  # no cluster was started to count devices
    # the default train.eval_tokens asks for more than the synthetic eval split will hold
    words = " ".join(printed.split())  # the log's lines are wrapped to the terminal
    assert "WARNING train.eval_tokens (262144) is more than the eval split holds (65536 rows)" in words
    assert not (tmp_path / "data").exists() and not (tmp_path / "sweeps").exists()  # nothing written


def test_plan_only_for_gpus_this_machine_lacks_says_how(tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # the message is for machines without GPUs
    code, printed, _ = plan_only(write_spec(tmp_path, device="cuda"))
    assert code == 2
    assert "resources.device: 'cuda' asked for, but this machine has no GPUs" in printed
    assert "--address" in printed and "device_memory_gb" in printed
    code, printed, ray_started = plan_only(write_spec(tmp_path, device="cuda", trainers=4, device_memory_gb=80))
    assert code == 0 and "cuda:0" in printed and not ray_started
