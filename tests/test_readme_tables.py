"""The README's speed tables are what bench/readme_tables.py renders from the committed results."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_speed_table_of_the_readme_is_rendered_from_a_committed_result():
    sys.path.insert(0, str(ROOT / "bench"))
    import readme_tables

    readme = (ROOT / "README.md").read_text()
    tables = readme_tables.rendered()
    assert len(tables) == len(readme_tables.TABLES) >= 10
    missing = [section for section, _, text in tables if text not in readme]
    assert not missing, f"README tables not as rendered from bench/results: {missing}"
    for section, files, text in tables:  # each names its result files in the README's prose
        assert all(f"bench/results/{f}" in readme for f in files), section


def test_the_serving_comparison_with_the_engine_before_is_the_committed_one():
    """The README's same-hour figures for the engine at 39d8953 come from its committed result."""
    import json

    r = json.loads((ROOT / "bench" / "results" / "serve_emergence-6m_39d8953.json").read_text())["median"]
    quoted = f"{r['ratio']:.2f}x: {r['sequential_tok_s']:,.0f} and {r['batched_tok_s']:,.0f} tok/s"
    assert quoted in " ".join((ROOT / "README.md").read_text().split())
