"""The README's support matrix is what the pass registry and the profile policies say today."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlower import support_matrix
from qlower.passes.registry import graph_passes_for, quantizer_passes_for
from qlower.pipeline import TARGETS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_matrix_is_current() -> None:
    current = support_matrix.section_of(README.read_text())
    assert current == support_matrix.render(), "the README's support matrix is stale: run `make matrix`"


def test_every_pass_has_a_row() -> None:
    matrix = support_matrix.render()
    for target in TARGETS:
        for rule in (*quantizer_passes_for(target), *graph_passes_for(target)):
            assert f"`{rule.name}`" in matrix


def test_write_replaces_only_between_the_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{support_matrix.START}\nold table\n{support_matrix.END}\noutro\n")
    assert support_matrix.main(["--write", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert support_matrix.section_of(text) == support_matrix.render()
    with pytest.raises(ValueError, match="markers"):
        support_matrix.replace_in("no markers here", "table")
