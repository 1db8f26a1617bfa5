"""docs/reliability.md names, for each promise, tests that exist."""

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_named_test_exists():
    section = (TESTS.parent / "docs" / "reliability.md").read_text()
    named = re.findall(r"`([\w/]+\.py)(?:::(\w+))?`", section)
    assert len(named) >= 10
    for path, test in named:
        assert (TESTS / path).is_file(), f"docs/reliability.md names tests/{path}, which does not exist"
        if test:
            assert re.search(rf"^def {test}\(", (TESTS / path).read_text(), re.M), f"tests/{path} has no {test}"
