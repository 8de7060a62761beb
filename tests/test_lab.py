"""The lab at smoke size (emergence.lab): the power-law and isoFLOP fits recover known laws; a
scaling sweep samples its corpus from the teacher, measures the floor E as the teacher's own
entropy (checked against a direct float64 computation), trains and fits the students, writes
its CSV, fits and plot, and resumes without redoing finished runs; bad sweeps are refused in
one line."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import emergence
from emergence.errors import InvalidArgument
from emergence.lab import fit
from emergence.lab.scaling import Setting, plan, sweep

from conftest import assert_one_line_error, cli_main  # noqa: E402

SMOKE = Setting(train_rows=256, val_rows=32, batch_size=8, sizes=((1, 16, 2), (1, 24, 2), (1, 32, 2), (1, 48, 2)),
                lrs=(1e-2,), data_fractions=(0.25, 0.5, 1.0), budgets=(3e9, 6e9))


def test_a_power_law_with_a_floor_is_recovered_exactly():
    n = np.geomspace(1e4, 1e6, 7)
    y = 1.3 + 40.0 * n ** -0.35
    law = fit.power_law(n, y)
    assert law.E == pytest.approx(1.3, abs=1e-4) and law.A == pytest.approx(40.0, rel=1e-3)
    assert law.alpha == pytest.approx(0.35, abs=1e-4) and law.r2 == pytest.approx(1.0, abs=1e-9)
    fixed = fit.power_law(n, y, E=1.3)
    assert fixed.alpha == pytest.approx(0.35, abs=1e-4) and fixed.A == pytest.approx(40.0, rel=1e-3)
    noisy = y + np.array([0.01, -0.01, 0.005, 0.0, -0.005, 0.01, -0.01])
    assert 0.98 < fit.power_law(n, noisy).r2 < 1.0
    with pytest.raises(InvalidArgument, match="at least 4 points"):
        fit.power_law(n[:3], y[:3])


def test_the_isoflop_optimum_is_the_parabolas_vertex():
    sizes = np.geomspace(1e4, 1e6, 5)
    losses = 2.0 + 0.3 * (np.log(sizes) - np.log(8e4)) ** 2
    assert fit.isoflop_optimum(sizes, losses) == pytest.approx(8e4, rel=1e-6)
    assert fit.isoflop_optimum(sizes, 5 - np.log(sizes)) == pytest.approx(1e6)  # no minimum inside: the largest
    slope, _ = fit.loglog_slope([1e12, 1e13, 1e14], [1e5, 10 ** 5.5, 1e6])
    assert slope == pytest.approx(0.5)


def test_a_smoke_sweep_fits_its_students_against_the_teachers_entropy_and_resumes(tmp_path):
    from emergence.data.shards import TokenShards

    logs: list[str] = []
    fits = sweep(SMOKE, tmp_path, log=logs.append)
    # the floor: the teacher's mean entropy over what each validation window predicts
    teacher = emergence.load("stories260K", device="cpu")
    val = TokenShards(tmp_path / "corpus").ids("val").reshape(-1, SMOKE.context)
    with torch.no_grad():
        logp = teacher.model(val[:-1]).double()[:, :-1].log_softmax(-1)
    expected = float(-(logp.exp() * logp).sum(-1).sum() / ((len(val) - 1) * SMOKE.context))
    assert fits["teacher_entropy"] == pytest.approx(expected, rel=1e-5)
    assert 0.5 < expected < 3.0  # a tiny teacher sampling at temperature 1
    assert (val[:, 0] == teacher.tokenizer.bos_id).all()  # every row is one context from BOS
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert len(rows) == 4 + 2 + 6 == len(plan(SMOKE, 512))  # sizes, data fractions below 1, isoFLOP runs that fit
    assert all(float(r["val_loss"]) > expected for r in rows)  # nobody beats the floor
    law = fits["L(N)"]["with_E_fixed_at_the_teacher_entropy"]
    assert law["E"] == fits["teacher_entropy"] and law["alpha"] > 0 and 0 < law["r2"] <= 1
    assert fits["L(N)"]["span"] == pytest.approx(37008 / 4144)
    assert len(fits["L(D)"]["points"]) == 3 and len(fits["isoFLOP"]["budgets"]) == 2
    assert json.loads((tmp_path / "fits.json").read_text()) == fits
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    assert sum(line.startswith("[") for line in logs) == len(rows)
    logs.clear()
    assert sweep(SMOKE, tmp_path, log=logs.append) == fits  # resumed: nothing trained again
    assert not any(line.startswith("[") for line in logs)


def test_bad_sweeps_are_refused_in_one_line(tmp_path, capsys):
    code, _, err = cli_main(capsys, "lab", "scaling", "--out", tmp_path, "--sizes", "1x16x2,1x32x2")
    assert_one_line_error(code, err, "at least 4 student sizes")
    code, _, err = cli_main(capsys, "lab", "scaling", "--out", tmp_path, "--sizes", "1x16x2,1x24x2,1x32x2,1x48x2",
                            "--budgets", "1e15")
    assert_one_line_error(code, err, "the isoFLOP budget 1e\\+15 fits 0 of the sizes .* give budgets between")
    code, _, err = cli_main(capsys, "lab", "scaling", "--out", tmp_path, "--sizes", "1x16")
    assert_one_line_error(code, err, "--sizes takes LAYERSxWIDTHxHEADS")
    (tmp_path / "setting.json").write_text(json.dumps({"teacher": "emergence-6m", "context": 128}))
    code, _, err = cli_main(capsys, "lab", "scaling", "--out", tmp_path)
    assert_one_line_error(code, err, "holds a sweep over another corpus")
