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


def test_make_bench_runs_every_benchmark_whose_result_the_readme_quotes():
    """Each result file the README cites exists; each written by a benchmark script (bench/bench_*.py,
    bench/soak_serve.py, named by the command line it records) records the commit and the machine,
    and `make bench` runs that script, so one run re-measures every figure."""
    import json
    import re

    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\nbench:"):makefile.index("\nclean:")]
    cited = sorted(set(re.findall(r"(?<!:)bench/results/([\w.-]+\.json)", readme)))  # not `git show REV:...`
    assert len(cited) >= 20
    benchmarks = set()
    for name in cited:
        path = ROOT / "bench" / "results" / name
        assert path.is_file(), name
        result = json.loads(path.read_text())
        command = result.get("command", "") if isinstance(result, dict) else ""
        script = re.search(r"\b(bench_\w+\.py|soak_serve\.py)", command)
        if script is None:  # another tool's result (a demonstration), or one recorded before commands were
            continue
        benchmarks.add(script.group(1))
        assert {"commit", "machine"} <= set(result), name
    assert len(benchmarks) >= 20
    missing = sorted(b for b in benchmarks if f"bench/{b}" not in recipe)
    assert not missing, f"make bench does not run {missing}"


def test_each_machine_page_is_rendered_from_that_machines_results():
    """docs/bench_amd.md (and docs/bench_xeon.md, where kept) is `readme_tables.py --machine M --write`
    of the committed results: every table once, each from that machine's run of `make bench`."""
    sys.path.insert(0, str(ROOT / "bench"))
    import readme_tables

    pages = {amd: ROOT / readme_tables.page_path(amd) for amd in (True, False)}
    assert pages[True].is_file()
    for amd, page in pages.items():
        if page.is_file():
            assert page.read_text() == readme_tables.machine_page(amd), f"{page.name}: rerun --machine --write"
    text = pages[True].read_text()
    assert "No result on this machine" not in text
    sections = [s for s, _, _ in readme_tables.machine_tables(True)]
    assert len(sections) == len(set(sections)) >= 20 and all(f"## {s}\n" in text for s in sections)
    assert "Intel" not in text  # each table from the EPYC's own results
