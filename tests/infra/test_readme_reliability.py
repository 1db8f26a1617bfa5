"""The README's reliability section names, for each promise, tests that exist."""

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_named_test_exists():
    text = (TESTS.parent / "README.md").read_text()
    section = text.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`([\w/]+\.py)(?:::(\w+))?`", section)
    assert len(named) >= 10
    for path, test in named:
        assert (TESTS / path).is_file(), f"the README's reliability section names tests/{path}, which does not exist"
        if test:
            assert re.search(rf"^def {test}\(", (TESTS / path).read_text(), re.M), f"tests/{path} has no {test}"
