"""`dictsweep bench ica`: both fits run on the same mixture and recover its sources."""

import json

import pytest
import torch
from typer.testing import CliRunner

from dictsweep.cli import app
from dictsweep.train.bench_baselines import ica_mixture, source_recovery


def test_source_recovery_matches_each_source_once():
    _, sources, _ = ica_mixture(2000, 3)
    # column 2 follows source 0 closely, but source 0 already has its exact copy in column 1
    estimated = torch.stack([-2 * sources[:, 2], sources[:, 0], sources[:, 0] + 0.01 * sources[:, 1]], 1)
    recovered = source_recovery(estimated, sources)
    assert recovered[0] == pytest.approx(1.0) and recovered[2] == pytest.approx(1.0)
    assert float(recovered[1]) < 0.05


def test_bench_ica_cli_reports_both_fits():
    out = CliRunner().invoke(app, ["bench", "ica", "--rows", "4000", "--dim", "6", "--json", "--device", "cpu"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["torch_converged"] and result["sklearn_converged"]
    assert result["torch_recovery"] > 0.98 and result["sklearn_recovery"] > 0.98
    assert abs(result["torch_recovery"] - result["sklearn_recovery"]) < 1e-3
    assert result["speedup"] == result["sklearn_seconds"] / result["torch_seconds"]
