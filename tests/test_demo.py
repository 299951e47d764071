"""The demo (run_lib.demo, main.py --mode demo) with tiny settings: the two runs side by side
in two processes give the same table as the same runs in turn, and the demo's own settings
are applied under the caller's overrides."""
import json

import torch

from run_lib import demo

TINY = {"device": "cpu", "model.nf": 8, "training.batch_size": 16,
        "training.snapshot_freq_for_preemption": 2, "sde.num_scales": 40,
        "sampling.num_samples": 4, "eval.likelihood_samples": 4, "eval.rtol": 1e-2,
        "eval.atol": 1e-2, "training.log_freq": 1}


def test_demo_settings_apply_under_overrides():
    assert set(demo.DEMO_SETTINGS) == set(demo.DEMO_RUNS)
    for name, settings in demo.DEMO_SETTINGS.items():
        config = demo.demo_config(name, n_iters=10)
        for key, value in settings.items():
            node = config
            for part in key.split("."):
                node = node[part]
            assert node == value, (name, key)
    config = demo.demo_config("vp", n_iters=10)
    assert demo.demo_config("vp", n_iters=10, overrides={"eval.rtol": 1e-2}).eval.rtol == 1e-2
    assert config.training.n_iters == config.training.snapshot_freq == 10


def test_runs_side_by_side_equal_runs_in_turn(tmp_path):
    """Each spawned worker takes torch.get_num_threads() // 2 threads (here 1, as the suite
    runs with one thread): the runs, their seeds and thread counts are the same, so on the CPU
    the numbers must agree to the last digit."""
    assert torch.get_num_threads() == 1
    in_turn = demo.run_demo(tmp_path / "turn", n_iters=2, progress=False, overrides=TINY,
                            parallel=False)
    side_by_side = demo.run_demo(tmp_path / "side", n_iters=2, progress=False, overrides=TINY,
                                 parallel=True)
    assert side_by_side == in_turn
    lines = in_turn.splitlines()
    assert [line.split(" | ")[1] for line in lines[2:]] == ["vpsde", "vesde"]
    assert "pc: NFE / pixel FD" in lines[0] and "ode: NFE / pixel FD" in lines[0]
    for name in demo.DEMO_RUNS:
        assert (tmp_path / "turn" / name / "samples_pc.png").exists()
        # N = 40 predictor steps and no corrector (DEMO_SETTINGS); the denoised output is
        # the last step's mean, no extra evaluation
        assert json.loads((tmp_path / "turn" / name / "samples_pc.json").read_text())["nfe"] == 40
    assert (tmp_path / "turn" / "comparison.md").read_text().strip() == in_turn
    times = json.loads((tmp_path / "side" / "demo_times.json").read_text())
    assert times["parallel"] is True and set(times["runs"]) == set(demo.DEMO_RUNS)
    for phases in times["runs"].values():
        assert set(phases) == {"train", "pc", "ode", "likelihood", "total"}
        # each phase is rounded to 0.1 s on its own
        assert phases["total"] >= phases["train"] + phases["likelihood"] - 0.1
    assert not json.loads((tmp_path / "turn" / "demo_times.json").read_text())["parallel"]
