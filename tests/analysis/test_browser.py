"""The feature browser in a real headless Chromium, opened from disk (file://, no server): the list
and a latent's view render, with no JavaScript error; screenshots are kept."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.analysis.conftest import data_dictionary

CHROMIUM = next((path for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if path), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install -y chromium)")
SCREENSHOTS = Path(os.environ.get("DICTSWEEP_SCREENSHOTS", "/tmp/dictsweep-screenshots"))


def chromium(tmp: Path, url: str, *args: str) -> str:
    """Run headless Chromium on `url` with a fresh profile; what it printed to stdout."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--window-size=1400,900",
        *args,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def rendered(tmp: Path, page: Path, hash_part: str = "") -> tuple[dict[str, str], str]:
    """(the body's data-* attributes, the text of #errors) of the page as rendered."""
    dom = chromium(tmp, page.as_uri() + hash_part, "--dump-dom")
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    attributes = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))
    errors = re.search(r'<pre id="errors"[^>]*>(.*?)</pre>', dom, re.S)
    return attributes, errors.group(1) if errors else "(no #errors element)"


def test_browser_opens_from_disk_and_renders_the_list_and_a_latent(minilm_harvest, tmp_path, run_cli):
    uri, _ = minilm_harvest
    folder = data_dictionary(tmp_path / "dictionary", uri, 64, seed=2)
    code, output = run_cli(
        "inspect", str(folder), "--data", uri, "--out", str(tmp_path / "out"), "--top", "8", "--device", "cpu"
    )
    assert code == 0, output
    page = tmp_path / "out" / "dictionary" / "index.html"

    view, errors = rendered(tmp_path, page)
    assert errors == "", errors
    assert view["view"] == "list" and int(view["rows"]) == 64

    import pyarrow.parquet as pq

    records = pq.read_table(tmp_path / "out" / "dictionary" / "latents.parquet").to_pylist()
    busiest = max(records, key=lambda record: record["fire_count"])
    view, errors = rendered(tmp_path, page, f"#latent={busiest['latent']}")
    assert errors == "", errors
    assert view["view"] == "latent" and view["latent"] == str(busiest["latent"])
    assert int(view["contexts"]) == len(busiest["contexts"]) > 0

    token = busiest["contexts"][0]["tokens"][busiest["contexts"][0]["center"]].removeprefix("##")
    view, errors = rendered(tmp_path, page, f"#search={token}")
    expected = sum(
        1 for r in records if any(c["kind"] == "top" and token in c["tokens"][c["center"]] for c in r["contexts"][:8])
    )
    assert errors == "" and view["view"] == "list" and 1 <= int(view["rows"]) <= 64

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for name, hash_part in (
        ("inspect-list.png", "#sort=frequency"),
        ("inspect-latent.png", f"#latent={busiest['latent']}"),
    ):
        chromium(tmp_path, page.as_uri() + hash_part, f"--screenshot={tmp_path / name}")
        assert (tmp_path / name).stat().st_size > 10_000  # a page with content, not a blank one
        shutil.copy(tmp_path / name, SCREENSHOTS / name)
    assert expected >= 1


def test_a_javascript_error_shows_in_the_page(minilm_harvest, tmp_path, run_cli):
    """The check above can fail: a broken latent file is reported in #errors, a missing data file too."""
    uri, _ = minilm_harvest
    folder = data_dictionary(tmp_path / "dictionary", uri, 8)
    code, output = run_cli(
        "inspect",
        str(folder),
        "--data",
        uri,
        "--out",
        str(tmp_path / "out"),
        "--top",
        "3",
        "--quantile-contexts",
        "0",
        "--device",
        "cpu",
    )
    assert code == 0, output
    out = tmp_path / "out" / "dictionary"
    (out / "latents" / "0000.js").write_text("dictsweepChunk({start: 0, latents: [")  # truncated file
    view, errors = rendered(tmp_path, out / "index.html", "#latent=1")
    # Chromium hides the details of an error in another file:// script ("Script error.")
    assert "error" in errors.lower() and "0000.js loaded but defined no latents" in errors
    assert view.get("view") != "latent"
    (out / "data.js").unlink()
    view, errors = rendered(tmp_path, out / "index.html")
    assert "data.js did not load" in errors and "rows" not in view
