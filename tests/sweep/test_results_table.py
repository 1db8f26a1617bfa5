"""The results table the CLI prints at the end of a sweep: one row per SAE, the sparsity column named
after what the sweep varied, failures and where to look next."""

from dictsweep.render import print_sweep
from dictsweep.sweep.plan import GridPoint, Plan
from dictsweep.sweep.results import SAEResult, SweepResult

METRICS = {"l0": 12.5, "fvu": 0.25, "dead_fraction": 0.0, "mmcs_ground_truth": 0.95}


def result_of(*points: GridPoint, failed: dict | None = None) -> SweepResult:
    result = SweepResult(
        plan=Plan(d_model=16, batch_rows=256, waves=[]), export_dir="/out/dictionaries", tracking_uri="sqlite:///m.db"
    )
    for point in points:
        result.finished[point.name] = SAEResult(point, dict(METRICS), uri="", run_id="")
    result.selected = {points[0].name}
    result.failed = failed or {}
    return result


def header(printed: str) -> list[str]:
    return next(line for line in printed.splitlines() if "n_latents" in line).split()


def test_relu_sweep_table(capsys):
    relu = [GridPoint("relu", 64, 0.003, 0, l1_coef=l1) for l1 in (1.0, 2.0)]
    print_sweep(result_of(*relu, failed={"relu-n64-l1_4-lr0.003-s0": "trainer w0-t0 failed: NaN\nmore"}))
    printed = capsys.readouterr().out
    assert header(printed) == ["arch", "n_latents", "l1_coef", "l0", "fvu", "dead", "mmcs_gt", "sel"]
    rows = [line.split() for line in printed.splitlines() if line.strip().startswith("relu ")]
    assert rows == [
        ["relu", "64", "1", "12.50", "0.2500", "0.000", "0.950", "*"],
        ["relu", "64", "2", "12.50", "0.2500", "0.000", "0.950"],
    ]
    assert "failed relu-n64-l1_4-lr0.003-s0: trainer w0-t0 failed: NaN" in printed
    assert "/out/dictionaries" in printed and "mlflow ui --backend-store-uri sqlite:///m.db" in printed
    assert all(len(line) <= 80 for line in printed.splitlines())


def test_widest_table_fits_80_columns_and_reasons_wrap_below(capsys):
    """Every optional column that can appear together (ground-truth recovery is for synthetic data,
    which has no model to splice or probe), the longest architecture name and sizes: nothing cut; the
    reasons (`why`) go under the table and wrap there."""
    points = [GridPoint("batchtopk", 1_048_576, 0.003, 0, k=128), GridPoint("jumprelu", 65_536, 0.003, 0, l1_coef=0.25)]
    result = result_of(*points)
    for outcome in result.finished.values():  # a harvested dataset: spliced and probed, no ground truth
        outcome.metrics.update(l0=1234.56, loss_recovered=0.876, sae_top_1_test_accuracy=0.912)
        outcome.metrics.pop("mmcs_ground_truth")
    result.why = {points[0].name: "Pareto-best of its size at L0 1234.56 within the band 1000-1500 asked for"}
    print_sweep(result)
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in printed
    assert header(printed) == [*("arch", "n_latents", "l1/k", "l0", "fvu", "dead", "loss_rec", "probe", "sel")]
    assert any(line.split()[:2] == ["batchtopk", "1048576"] and line.split()[-1] == "*" for line in lines)
    assert f"* {points[0].name}: Pareto-best of its size" in printed and "asked for" in printed


def test_seed_lines_under_the_table(capsys):
    """A grid point of several seeds: its means and 95% intervals and its feature stability, in a line."""
    result = result_of(GridPoint("topk", 64, 0.003, 0, k=8))
    result.seeds = [
        {
            "point": "topk-n64-k8-lr0.003",
            "seeds": 3,
            "feature_stability": 0.8123,
            "fvu": 0.25,
            "fvu_ci95": 0.0125,
            "l0": 8.0,
            "l0_ci95": 0.0,
        }
    ]
    print_sweep(result)
    printed = " ".join(capsys.readouterr().out.split())
    assert (
        "topk-n64-k8-lr0.003 (3 seeds, 95% t-interval): fvu 0.25 +- 0.0125, l0 8 +- 0, feature stability 0.812"
        in printed
    )


def test_mixed_sweep_names_both_sparsity_settings(capsys):
    print_sweep(result_of(GridPoint("topk", 64, 0.003, 0, k=8), GridPoint("relu", 64, 0.003, 0, l1_coef=1.0)))
    assert header(capsys.readouterr().out)[2] == "l1/k"
    print_sweep(result_of(GridPoint("topk", 64, 0.003, 0, k=8)))
    assert header(capsys.readouterr().out)[2] == "k"


def test_sae_steered_to_an_l0_target_keeps_its_name_and_its_star(capsys):
    """A finished SAE of an L0 target carries its final coefficient (as the ledger records it): its
    name, and so its selection mark, are still those of its grid point."""
    import dataclasses

    point = GridPoint("relu", 64, 0.003, 0, target_l0=16.0)
    steered = dataclasses.replace(point, l1_coef=2.5)
    assert steered.name == point.name == "relu-n64-l0_16-lr0.003-s0"
    result = result_of(point)
    result.finished[point.name] = SAEResult(steered, dict(METRICS), uri="", run_id="")
    print_sweep(result)
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("relu ")]
    assert rows == [["relu", "64", "2.5", "12.50", "0.2500", "0.000", "0.950", "*"]]
