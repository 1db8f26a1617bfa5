"""The README and the docs point at things that exist: commands of the CLI, exit codes of the errors,
files under infra/ and jobs/, pages of docs/; the README's spec example validates; and every YAML under
infra/ and jobs/ is claimed by a validating test."""

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = (REPO / "README.md", REPO / "infra" / "README.md", *sorted((REPO / "docs").glob("*.md")))


def code(text: str) -> str:
    """The fenced blocks and inline code spans of a markdown text."""
    return "\n".join(re.findall(r"```.*?```", text, re.S) + re.findall(r"`[^`\n]+`", text))


def documented_commands() -> set[str]:
    words = set()
    for doc in DOCS:
        words |= set(re.findall(r"\bdictsweep ([a-z][a-z-]+)\b", code(doc.read_text())))
    return words


@pytest.mark.parametrize("command", sorted(documented_commands()))
def test_documented_commands_exist(command):
    import typer.main

    from dictsweep.cli import app

    group = typer.main.get_command(app)
    assert command in group.commands, f"the docs show `dictsweep {command}`, which the CLI does not have"


def test_exit_codes_match_the_errors():
    from dictsweep.errors import InputError, RunError

    text = (REPO / "docs" / "reference.md").read_text()
    assert InputError.exit_code == 2 and RunError.exit_code == 1
    assert re.search(r"\| 0 \| Done", text) and re.search(r"\| 2 \| Invalid input", text)
    assert re.search(r"\| 1 \| A failure while running", text)


def test_paths_in_the_docs_exist():
    for doc in DOCS:
        for path in set(
            re.findall(r"(?<![\w/.])((?:infra|jobs)/[\w./-]+\.(?:yaml|md|txt|example))\b", doc.read_text())
        ):
            if path.startswith("jobs/") and not (REPO / path).exists():
                continue  # the jobs are written by others; test_infra_jobs validates those that exist
            assert (REPO / path).exists(), f"{doc.name} mentions {path}, which does not exist"


def test_every_yaml_is_claimed_by_a_validating_test():
    """New YAML under infra/ must be of a kind some test validates (launcher, compose, k8s)."""
    claimed = {"ray": "test_infra_launcher", "compose": "test_infra_compose", "k8s": "test_infra_kuberay"}
    for path in sorted((REPO / "infra").rglob("*.y*ml")):
        documents = list(yaml.safe_load_all(path.read_text()))  # every document parses
        assert documents, path
        folder = path.relative_to(REPO / "infra").parts[0]
        assert folder in claimed, f"{path}: no test validates YAML in infra/{folder}/"
    for path in sorted((REPO / "jobs").glob("*.y*ml")):
        yaml.safe_load(path.read_text())  # test_infra_jobs validates it as a spec


def test_infra_readme_lists_every_file():
    text = (REPO / "infra" / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w./-]+)` \|", text, re.M))
    present = {
        str(path.relative_to(REPO / "infra"))
        for path in (REPO / "infra").rglob("*")
        if path.is_file()
        and path.name != "README.md"
        and "__pycache__" not in path.parts
        and not (path.suffix == ".env" or path.name == ".env")
    }  # a user's own secrets files
    assert listed == present, (
        f"infra/README.md lists {sorted(listed - present)} that do not exist, misses {sorted(present - listed)}"
    )


def test_links_between_the_docs_lead_to_pages_and_headings_that_exist():
    def anchors(path: Path) -> set[str]:
        headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
        return {re.sub(r"[^\w\- ]", "", heading).strip().lower().replace(" ", "-") for heading in headings}

    for doc in (REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))):
        for target, anchor in re.findall(r"\]\(((?:docs/)?[\w-]+\.md)(?:#([\w-]+))?\)", doc.read_text()):
            page = (doc.parent / target).resolve()
            assert page.is_file(), f"{doc.name} links to {target}, which does not exist"
            assert not anchor or anchor in anchors(page), f"{doc.name} links to {target}#{anchor}: no such heading"


def test_the_readme_spec_example_validates(tmp_path):
    from dictsweep.spec_file import load_spec

    text = (REPO / "README.md").read_text()
    (example,) = [block for block in re.findall(r"```yaml\n(.*?)```", text, re.S) if "grid:" in block]
    (tmp_path / "sweep.yaml").write_text(example)
    spec = load_spec(str(tmp_path / "sweep.yaml"))
    assert spec.grid.architecture == ["relu", "topk"] and spec.select.l0 == [8, 128]


def test_the_readme_commands_are_the_ones_ci_runs():
    blocks = re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)
    main, tests = blocks[0].strip(), blocks[1].strip()
    assert main.endswith("dictsweep run jobs/quickstart.yaml") and "\n" not in main
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()  # the same line, character for character
