"""The docs' examples as a user copies them: every YAML block parses and names only known keys,
and the commands they sit beside name files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from diffseg.config import deep_merge, load_yaml, resolve_run_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "config" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def yaml_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of each fenced ```yaml block of a Markdown file."""
    text = path.read_text()
    return [
        (text[: m.start()].count("\n") + 1, m.group(1))
        for m in re.finditer(r"^```yaml\n(.*?)^```", text, flags=re.S | re.M)
    ]


BLOCKS = [(p, line, block) for p in DOCS for line, block in yaml_blocks(p)]


def test_the_readme_has_yaml_examples():
    assert sum(p.name == "README.md" and p.parent == ROOT for p, _, _ in BLOCKS) >= 2


@pytest.mark.parametrize(("path", "line", "block"), BLOCKS, ids=[f"{p.name}:{n}" for p, n, _ in BLOCKS])
def test_yaml_blocks_parse_and_name_known_keys(path, line, block):
    """Over the demo config, as a user adds it: valid, and every run it asks for resolves."""
    example = yaml.safe_load(block)
    assert isinstance(example, dict), f"{path.name}:{line}: not a mapping"
    config = deep_merge(load_yaml(ROOT / "config" / "config.yaml"), example)
    validate_config(config, where=f"{path.name}:{line}")
    for entry in config.get("experiments") or []:
        for dataset in entry["datasets"]:
            for dim in entry["dims"]:
                for variant in entry["variants"]:
                    resolve_run_config(config, dataset, f"{dim}-{variant}")


def test_files_the_readme_names_exist():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"\((?!https?:)([\w./-]+\.(?:md|yaml|py|sh))\)", readme))
    folders = "config|docs|benchmarks|workflow|profiles"
    named |= set(re.findall(rf"`((?:{folders})/[\w./-]+\.(?:md|yaml|py|sh))`", readme))
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, missing
