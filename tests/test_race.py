"""The few-step race's bookkeeping (bench/samplers.py --race2): FD averaged over seeds as mean FD
/ mean floor, the best row per family, and paired verdicts that call a difference a win or a
loss only when it exceeds both 5 % and two standard errors of the per-seed differences; and
one tiny end-to-end run on the CPU without k-diffusion."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def race():
    spec = importlib.util.spec_from_file_location("bench_samplers", ROOT / "bench" / "samplers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_samplers"] = module      # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _rows(values, floors, cell=("d", "VP", 5)):
    """values: {(family, sampler): [FD per seed]}; floors: [floor per seed]."""
    return [dict(dist=cell[0], sde=cell[1], budget=cell[2], seed=seed, floor=floors[seed],
                 family=family, sampler=sampler, nfe=cell[2], fd=fd,
                 ratio=None if fd is None else fd / floors[seed], error=None)
            for (family, sampler), fds in values.items() for seed, fd in enumerate(fds)]


def test_verdict_needs_both_five_percent_and_two_standard_errors(race):
    theirs = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}
    # 20 % lower on every seed: a win; 20 % higher: a loss
    assert race.race_verdict({s: 0.8 for s in theirs}, theirs, 1.0) == "win"
    assert race.race_verdict({s: 1.2 for s in theirs}, theirs, 1.0) == "loss"
    # within 5 %: a tie however consistent
    assert race.race_verdict({s: 0.97 for s in theirs}, theirs, 1.0) == "tie"
    # 20 % lower on average but the seeds disagree (differences -1.2, +0.4, +0.4, -0.4,
    # mean -0.2, standard error 0.37): a tie
    assert race.race_verdict({0: -0.2, 1: 1.4, 2: 1.4, 3: 0.6}, theirs, 1.0) == "tie"
    # one seed: the 5 % rule alone
    assert race.race_verdict({0: 0.9}, {0: 1.0}, 1.0) == "win"


def test_cells_average_fd_over_seeds_and_pick_the_best_row(race):
    floors = [0.1, 0.3]
    rows = _rows({("ours", "a"): [0.2, 0.4], ("ours", "ipndm (default)"): [0.2, 0.5],
                  ("ours", "failed"): [None, 0.1],
                  ("k-diffusion", "x"): [0.3, 0.5], ("k-diffusion", "y"): [0.25, 0.9],
                  ("converged ODE", race.RACE_CONVERGED): [0.1, 0.3]}, floors)
    (cell,) = race.race_cells(rows)
    # mean FD / mean floor: a 0.3 / 0.2, ipndm 0.35 / 0.2, x 0.4 / 0.2, y 0.575 / 0.2
    assert cell["ours"] == "a" and cell["ours_ratio"] == pytest.approx(1.5)
    assert cell["k"] == "x" and cell["k_ratio"] == pytest.approx(2.0)
    assert cell["converged_ratio"] == pytest.approx(1.0)
    assert cell["verdict"] == "win" and cell["seeds"] == 2
    # ipndm against x: differences -0.1 and 0, mean -0.05 within two standard errors (0.1)
    assert cell["defaults"]["ipndm (default)"] == dict(ratio=pytest.approx(1.75), verdict="tie")
    # a row that failed on one seed is no candidate, and the every-row summary counts it
    lines = race.race_every_row(rows).splitlines()
    failed = next(line for line in lines if line.split()[1] == "failed")
    assert "5: 0/0/0 (1)" in failed


def test_race_runs_end_to_end_without_k_diffusion(race, tmp_path):
    out = tmp_path / "race.json"
    args = race.parse_args(["--race2", "--race-distributions", "spiral20", "--sdes", "VE",
                            "--budgets", "5", "--samples", "200", "--race-seeds", "1,2",
                            "--out", str(out)])
    assert race.race_two(args, None) == 0
    result = json.loads(out.read_text())
    assert {r["seed"] for r in result["rows"]} == {1, 2}
    (cell,) = result["cells"]
    assert cell["k"] is None and cell["verdict"] == "-" and cell["seeds"] == 2
    assert set(cell["defaults"]) == set(race.RACE_DEFAULTS)
    merged = tmp_path / "merged.json"
    args = race.parse_args(["--race2", "--race-merge", str(out), str(out), "--out", str(merged)])
    assert race.race_two(args, None) == 0
