"""`--plan-only` without Ray: the local machine (or the spec) settles the devices, and nothing is
started or written."""

import ray
import yaml


def write_spec(tmp_path, **resources) -> str:
    spec = {"name": "planonly", "data": {"uri": str(tmp_path / "data"), "synth": {"d_model": 48, "rows": 4096}},
            "grid": {"architecture": ["relu", "topk"], "n_latents": [64, 128], "k": [4]},
            "storage": {"dir": str(tmp_path / "sweeps")}, "resources": resources}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_plan_only_uses_the_local_machine_without_ray(tmp_path, run_cli, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    code, printed = run_cli("run", write_spec(tmp_path), "--plan-only")  # device auto: this machine decides
    assert code == 0, printed
    assert "d_model=48" in printed and "cpu:0" in printed and "4 SAEs" in printed
    assert not ray.is_initialized()  # no cluster was started to count devices
    # the default train.eval_tokens asks for more than the synthetic eval split will hold
    assert "warning: train.eval_tokens (262144) is more than the eval split holds (65536 rows)" in printed
    assert not (tmp_path / "data").exists() and not (tmp_path / "sweeps").exists()  # nothing written


def test_plan_only_for_gpus_this_machine_lacks_says_how(tmp_path, run_cli, monkeypatch):
    import torch

    if torch.cuda.is_available():
        return  # the message is for machines without GPUs
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, printed = run_cli("run", write_spec(tmp_path, device="cuda"), "--plan-only")
    assert code == 2
    assert "resources.device: 'cuda' asked for, but this machine has no GPUs" in printed
    assert "--address" in printed and "device_memory_gb" in printed
    code, printed = run_cli("run", write_spec(tmp_path, device="cuda", trainers=4, device_memory_gb=80),
                            "--plan-only")
    assert code == 0 and "cuda:0" in printed and not ray.is_initialized()
