"""Bad numbers in a spec stop the sweep before anything starts: nan and inf anywhere, true/false
where a number is meant; the error names where the value came from and the field, exit 2."""

import pytest
import yaml

from dictsweep.spec_file import load_spec

SPEC = {
    "name": "numbers",
    "data": {"uri": "data/x", "synth": {"d_model": 8, "rows": 1000}},
    "grid": {"n_latents": [16], "l1_coef": [1.0], "lr": [0.001]},
}


@pytest.fixture
def spec_path(tmp_path):
    path = tmp_path / "numbers.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return str(path)


@pytest.mark.parametrize(
    "assignment, field",
    [
        ("grid.l1_coef=[1.0, .nan]", "grid.l1_coef.1"),
        ("grid.lr=[.inf]", "grid.lr.0"),
        ("grid.lr=[nan]", "grid.lr.0"),
        ("train.grad_clip=.inf", "train.grad_clip"),
        ("train.adam_eps=-.inf", "train.adam_eps"),
        ("resources.device_memory_gb=.nan", "resources.device_memory_gb"),
        ("data.synth.noise=.inf", "data.synth.noise"),
        ("train.tokens=true", "train.tokens"),
        ("train.lr_decay_fraction=false", "train.lr_decay_fraction"),
        ("grid.n_latents=[16, true]", "grid.n_latents"),
        ("grid.seed=[false]", "grid.seed"),
        ("stream.batches_in_flight=true", "stream.batches_in_flight"),
        ("data.synth.rows=true", "data.synth.rows"),
    ],
)
def test_bad_number_exits_2_naming_the_field(spec_path, run_cli, assignment, field):
    code, output = run_cli("run", spec_path, "--set", assignment)
    # a value given by --set is blamed on the --set, naming the field
    assert code == 2 and f"--set {assignment}: field '{field}'" in output and "Traceback" not in output, output
    assert len(output.strip().splitlines()) == 1


def test_numbers_written_as_yaml_reads_them_still_load(spec_path):
    """PyYAML reads `3e-4` as a string; the spec takes it as the number it means, and real booleans
    where booleans are meant."""
    spec = load_spec(spec_path, ["grid.lr=[3e-4, 1e30]", "train.tokens=2.0e+4", "resources.zero_offload=true"])
    assert spec.grid.lr == [3e-4, 1e30] and spec.train.tokens == 20_000 and spec.resources.zero_offload is True
