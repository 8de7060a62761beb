"""`emergence lab bitnet` (emergence.lab.bitnet): a tiny sweep end to end through the CLI; the best
run per size and kind and the gap recomputed from the CSV; the students are what their kind says
(BitLinear in every block of a ternary one, nn.Linear in a full one) and load as such; a rerun
trains nothing; too few sizes refused in one line."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from emergence.cli import main
from emergence import products
from emergence.lab import bitnet, scaling
from emergence.quant.linear import TernaryLinear

ARGS = ["--sizes", "1x16x2,1x24x2,1x32x2", "--train-rows", "64", "--lrs", "0.01", "0.003"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("bitnet")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert main(["lab", "bitnet", "--out", str(out), *ARGS]) in (None, 0)
    finally:
        torch.set_num_threads(threads)
    return out


def test_every_size_trains_twice_per_learning_rate():
    setting = scaling.Setting(sizes=((1, 16, 2), (1, 24, 2), (1, 32, 2)), lrs=(0.01, 0.003))
    runs = bitnet.runs_of(setting, 512)
    assert len(runs) == 2 * 3 * 2 and len({r.key for r in runs}) == len(runs)
    assert {r.kind for r in runs} == {"full", "ternary"}
    full = {(r.n_layer, r.n_embd, r.lr, r.tokens) for r in runs if r.kind == "full"}
    assert full == {(r.n_layer, r.n_embd, r.lr, r.tokens) for r in runs if r.kind == "ternary"}  # same tokens


def test_best_per_size_and_the_gap_come_from_the_csv(sweep):
    with open(sweep / "bitnet.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    result = json.loads((sweep / "bitnet.json").read_text())
    assert len(result["sizes"]) == 3 and result["teacher_entropy"] > 0
    for size in result["sizes"]:
        for kind in ("full", "ternary"):
            mine = [float(r["val_loss"]) for r in rows if r["kind"] == kind and int(r["params"]) == size["params"]]
            assert len(mine) == 2 and size[kind] == pytest.approx(min(mine))
        assert size["gap"] == pytest.approx(size["ternary"] - size["full"])
        assert size["full"] > result["teacher_entropy"] and size["ternary"] > result["teacher_entropy"]
    assert (sweep / "bitnet.png").read_bytes()[:4] == b"\x89PNG"


def test_students_are_of_their_kind(sweep):
    """A ternary student trained with BitLinear saves as the ternary checkpoint it computes
    (TernaryLinear in every block projection, its weights three values times a scale); a full
    one keeps the model's plain linear layer (products.Linear, an nn.Linear)."""
    import emergence

    for kind in ("full", "ternary"):
        folder = next((sweep / "runs").glob(f"{kind}-1x24-*")) / "model"
        lm = emergence.load(str(folder), device="cpu")
        proj = [m for name, m in lm.model.named_modules()
                if name.startswith("layers.") and name.rsplit(".", 1)[-1].endswith("proj")]
        assert len(proj) == 4
        assert all(isinstance(m, TernaryLinear) == (kind == "ternary") for m in proj)
        if kind == "full":
            assert all(type(m) is products.Linear for m in proj)
        else:
            for m in proj:
                assert len(torch.unique(m.dequantize())) == 3  # -s, 0, +s


def test_a_rerun_trains_nothing_and_few_sizes_are_refused(sweep, tmp_path, capsys):
    before = (sweep / "bitnet.csv").read_text()
    assert main(["lab", "bitnet", "--out", str(sweep), *ARGS]) in (None, 0)
    assert (sweep / "bitnet.csv").read_text() == before
    capsys.readouterr()
    assert main(["lab", "bitnet", "--out", str(tmp_path / "o"), "--sizes", "1x16x2,1x24x2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 3 sizes" in err[0]


def test_the_committed_lab_page_quotes_the_committed_bitnet_results():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "bench" / "results" / "lab_bitnet.json").read_text())
    page = (root / "docs" / "lab.md").read_text()
    for s in result["sizes"]:
        assert s["gap"] == pytest.approx(s["ternary"] - s["full"])
        assert (f"| {s['shape']} | {s['params']:,} | {s['full']:.4f} ({s['full_lr']:g}) | {s['ternary']:.4f} "
                f"({s['ternary_lr']:g}) | {s['gap']:+.3f} |") in page
