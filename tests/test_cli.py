"""The command line: `--version`, flags shown as flags, spec mistakes as one line with exit 2."""

from dictsweep import __version__


def test_version(run_cli):
    assert run_cli("--version") == (0, f"dictsweep {__version__}\n")


def test_flags_take_no_value_in_help(run_cli):
    code, text = run_cli("run", "--help")
    assert code == 0
    lines = {line.split()[1]: line for line in text.splitlines() if line.startswith("│ --")}
    assert "<bool>" not in text
    assert lines["--plan-only"].split()[2] == "Print" and "<str>" in lines["--address"]


def test_bad_set_is_blamed_on_the_set(run_cli, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: clihints\ndata: {uri: /tmp/none}\ngrid: {n_latents: [64]}\n")
    code, text = run_cli("run", str(spec), "--set", "grid.n_latents=-64", "--plan-only")
    assert code == 2
    assert text.strip() == "error: --set grid.n_latents=-64: field 'grid.n_latents': every value must be > 0, got -64"
