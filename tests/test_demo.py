"""The demo (run_lib.demo, main.py --mode demo) with tiny settings: the two runs side by side
in two processes give the same table as the same runs in turn, the table's headline is the
digits FID / IS of --mode eval for PC, the ODE and DPM-Solver next to bits/dim (no pixel
FD), and the demo's own settings are applied under the caller's overrides."""
import json

import pytest
import torch

from run_lib import demo
from run_lib.digits_classifier import digits_classifier

TINY = {"device": "cpu", "model.nf": 8, "training.batch_size": 16,
        "training.snapshot_freq_for_preemption": 2, "sde.num_scales": 40,
        "sampling.num_samples": 4, "eval.likelihood_samples": 4, "eval.rtol": 1e-2,
        "eval.atol": 1e-2, "training.log_freq": 1, "sampling.dpm_solver.num_steps": 5,
        "eval.num_samples": 24, "eval.sample_batch": 12, "eval.kid_subsets": 3,
        "eval.kid_subset_size": 10, "eval.is_splits": 2}


def test_demo_settings_apply_under_overrides():
    assert set(demo.DEMO_SETTINGS) == set(demo.DEMO_RUNS)
    for name, settings in demo.DEMO_SETTINGS.items():
        config = demo.demo_config(name, n_iters=10)
        for key, value in settings.items():
            node = config
            for part in key.split("."):
                node = node[part]
            assert node == value, (name, key)
        assert config.eval.num_samples == 500 and config.eval.use_ema
    config = demo.demo_config("vp", n_iters=10)
    assert demo.demo_config("vp", n_iters=10, overrides={"eval.rtol": 1e-2}).eval.rtol == 1e-2
    assert config.training.n_iters == config.training.snapshot_freq == 10
    assert demo.DEMO_SAMPLERS == ("pc", "ode", "dpm_solver")


def test_a_bad_sampler_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="ald"):
        demo.run_demo(tmp_path / "bad", n_iters=2, samplers=("pc", "ald"), progress=False,
                      overrides=TINY, parallel=False)
    assert not (tmp_path / "bad").exists()


def _cell(table: str, row: str, column: str) -> str:
    lines = [line.strip("| ").split(" | ") for line in table.splitlines()]
    return dict(zip(lines[0], next(line for line in lines[2:] if line[0] == row)))[column]


def test_runs_side_by_side_equal_runs_in_turn(tmp_path):
    """Each spawned worker takes torch.get_num_threads() // 2 threads (here 1, as the suite
    runs with one thread): the runs, their seeds and thread counts are the same, so on the CPU
    the numbers must agree to the last digit. A one-epoch digits classifier in the runs'
    data directory stands in for the 40-epoch one; the reference statistics of the 1500
    training digits are made by the demo before the runs start."""
    assert torch.get_num_threads() == 1
    overrides = {**TINY, "data.data_dir": str(tmp_path / "data")}
    digits_classifier(tmp_path / "data" / "digits_classifier.pt", epochs=1)
    in_turn = demo.run_demo(tmp_path / "turn", n_iters=2, progress=False, overrides=overrides,
                            parallel=False)
    assert len(list((tmp_path / "data" / "ref_stats").glob("digits-train-*.npz"))) == 1
    side_by_side = demo.run_demo(tmp_path / "side", n_iters=2, progress=False,
                                 overrides=overrides, parallel=True)
    assert side_by_side == in_turn
    lines = in_turn.splitlines()
    assert [line.split(" | ")[1] for line in lines[2:]] == ["vpsde", "vesde"]
    assert "pixel FD" not in lines[0]
    nfe = {"pc": 40, "dpm_solver": 6}     # N = 40 steps, no corrector; 5 steps + denoise
    for name in demo.DEMO_RUNS:
        workdir = tmp_path / "turn" / name
        assert not list(workdir.glob("samples_*.json"))
        for method in demo.DEMO_SAMPLERS:
            result = json.loads((workdir / f"eval_{method}.json").read_text())
            assert (workdir / f"eval_{method}.png").exists()
            protocol = result["protocol"]
            assert protocol["num_samples"] == 24 and protocol["weights"] == "ema"
            assert protocol["reference"]["num_images"] == 1500
            assert protocol["step"] == 2 and protocol["sampler"] == method
            if method in nfe:
                assert protocol["nfe"] == nfe[method], (name, method)
            assert _cell(in_turn, name, f"{method}: FID / IS (N, NFE)") == (
                f"{result['fid']:.3f} / {result['is']:.2f} (N 24, NFE {protocol['nfe']})")
            assert result["fid"] > 0 and 1 <= result["is"] <= 10
        like = json.loads((workdir / "likelihood.json").read_text())
        assert _cell(in_turn, name, "bits/dim (or NLL)").startswith(f"{like['bits_per_dim']:.3f}")
    assert (tmp_path / "turn" / "comparison.md").read_text().strip() == in_turn
    times = json.loads((tmp_path / "side" / "demo_times.json").read_text())
    assert times["parallel"] is True and set(times["runs"]) == set(demo.DEMO_RUNS)
    for phases in times["runs"].values():
        assert set(phases) == {"train", *demo.DEMO_SAMPLERS, "likelihood", "total"}
        # each phase is rounded to 0.1 s on its own
        assert phases["total"] >= phases["train"] + phases["likelihood"] - 0.1
    assert not json.loads((tmp_path / "turn" / "demo_times.json").read_text())["parallel"]


def test_a_second_demo_reuses_the_drawn_chunks(tmp_path):
    """Started again, the demo trains nothing and draws no chunk: the evaluations read
    the chunks on disk and give the same table."""
    overrides = {**TINY, "data.data_dir": str(tmp_path / "data"), "eval.num_samples": 12,
                 "sampling.ode.rtol": 1e-2, "sampling.ode.atol": 1e-2}
    digits_classifier(tmp_path / "data" / "digits_classifier.pt", epochs=1)
    first = demo.run_demo(tmp_path / "d", n_iters=2, samplers=("dpm_solver",), progress=False,
                          overrides=overrides, parallel=False)
    again = demo.run_demo(tmp_path / "d", n_iters=2, samplers=("dpm_solver",), progress=False,
                          overrides=overrides, parallel=False)
    assert again == first
    result = json.loads((tmp_path / "d" / "vp" / "eval_dpm_solver.json").read_text())
    assert result["timing"]["chunks_drawn_now"] == 0 and result["timing"]["chunks"] == 1
