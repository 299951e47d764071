"""run_lib.plan and python main.py --mode plan: the extrapolated activation memory of a training
step reproduces a directly measured larger case, checkpointing and bf16 lower it, the CLI
prints the table and writes plan.json, a bad budget is one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs.ve.ncsnpp_cifar import get_config as ncsnpp_cifar
from models.layers import set_checkpointing
from run_lib import compose, plan

ROOT = Path(__file__).resolve().parents[1]


def small_ncsnpp(image_size=64):
    """NCSN++ of the CIFAR config at 1/8 width, 4 levels (sizes: multiples of 8)."""
    config = ncsnpp_cifar()
    config.model.nf = 16
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (image_size // 4,)
    config.data.image_size = image_size
    config.training.batch_size = 32
    return config


@pytest.fixture(scope="module")
def measured_small():
    torch.manual_seed(0)
    config = small_ncsnpp()
    model = compose.build_model(config).train()
    return config, model, plan._objective(config, model, bf16=False, device="cpu")


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_extrapolation_reproduces_a_measured_larger_case(measured_small, checkpointing):
    """Fit at batch 1 / 2 and 8 / 16 px (1/8, 1/4 of 64), predict batch 4 at 32 px (half
    size: 16 x the pixels of the smaller fit), then measure it: within 10 %. A fit that
    ignored the pixels (per-image bytes of the 16 px case) would be off by far more."""
    config, model, objective = measured_small

    def saved(b, s):
        set_checkpointing(model, False)
        plain, block = plan.measure_saved_bytes(objective, model, b, s, blocks=True)
        if not checkpointing:
            return plain
        set_checkpointing(model, True)
        try:
            return plan.measure_saved_bytes(objective, model, b, s)[0] + block
        finally:
            set_checkpointing(model, False)
    points = {(b, s): saved(b, s) for b in (1, 2) for s in (8, 16)}
    fit = plan.fit_activations(points)
    predicted = plan.evaluate_fit(fit, 4, 32)
    measured = saved(4, 32)
    error = (predicted - measured) / measured
    print(f"checkpointing={checkpointing}: predicted {predicted / 2**20:.1f} MiB, measured "
          f"{measured / 2**20:.1f} MiB, relative error {error:+.2%}")
    assert abs(error) < 0.10
    per_image_16 = points[(2, 16)] - points[(1, 16)]
    naive = points[(1, 16)] + 3 * per_image_16          # batch only, no pixel scaling
    assert abs(naive - measured) / measured > 0.3


@pytest.fixture(scope="module")
def small_plan():
    config = small_ncsnpp(image_size=32)
    return config, plan.plan(config, (1.5, 80), device="cpu", fit_sizes=(8, 16),
                             check_size=24)


def test_checkpointing_and_bf16_lower_the_estimate(small_plan):
    config, report = small_plan
    per = {k: v["activation_bytes_per_image"] for k, v in report["per_image"].items()}
    assert per["fp32+ckpt"] < 0.6 * per["fp32"]
    assert per["bf16"] < 0.8 * per["fp32"]
    assert per["bf16+ckpt"] < per["bf16"] and per["bf16+ckpt"] < per["fp32+ckpt"]
    check = report["activations"]["variants"]["fp32"]["pixel_fit_check"]
    assert abs(check["relative_error"]) < 0.10, check
    rows = {(r["budget_gib"], r["variant"]): r for r in report["rows"]}
    assert len(rows) == 8
    for budget in (1.5, 80):
        assert rows[(budget, "fp32")]["largest_batch"] <= rows[(budget, "fp32+ckpt")]["largest_batch"]
        assert rows[(budget, "fp32")]["largest_batch"] <= rows[(budget, "bf16")]["largest_batch"]
    assert rows[(80, "fp32")]["largest_batch"] > rows[(1.5, "fp32")]["largest_batch"]
    small = rows[(1.5, "fp32")]
    if 0 < small["largest_batch"] < 32:          # accumulation over the global batch of 32
        assert small["batch_per_device"] <= small["largest_batch"]
        assert 32 % small["batch_per_device"] == 0
        assert small["micro_batches"] == 32 // small["batch_per_device"]
    # predict_memory: bytes that grow with the batch, margin included
    one = plan.predict_memory(config, 1, measured={"state": report["state"],
                                                   "activations": report["activations"]})
    eight = plan.predict_memory(config, 8, measured={"state": report["state"],
                                                     "activations": report["activations"]})
    assert eight["total_bytes"] > one["total_bytes"] > one["params_optimizer_bytes"]
    assert one["total_bytes"] >= one["raw_bytes"] + plan.OVERHEAD_BYTES
    assert "extrapolated" in one["method"]
    state = report["state"]
    assert state["state_bytes"] == 20 * state["parameters"] or state["parameters"] > \
        state["trainable_parameters"]


def test_accumulation_divides_the_share():
    config = small_ncsnpp()
    config.training.batch_size = 64
    assert plan.accumulation(config, 100) == {"batch_per_device": 0, "micro_batches": 1,
                                              "share": 64}
    assert plan.accumulation(config, 20) == {"batch_per_device": 16, "micro_batches": 4,
                                             "share": 64}
    assert plan.accumulation(config, 0)["batch_per_device"] is None


def _main(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_the_table_and_writes_plan_json(tmp_path):
    out = _main("--mode", "plan", "--config", "configs/ve/ncsnpp_digits.py",
                "--budget_gb=2,80", "--workdir", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "| budget GiB | variant | largest batch/device |" in text
    assert "EXTRAPOLATED" in text and "parameters:" in text
    for variant in ("fp32", "fp32+ckpt", "bf16", "bf16+ckpt"):
        assert f"| 80 | {variant} |" in text and f"| 2 | {variant} |" in text
    report = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert len(report["rows"]) == 8
    assert report["activations"]["method"] == "extrapolated"
    assert {r["method"] for r in report["rows"]} <= {"extrapolated",
                                                      "extrapolated, fp32 halved"}


@pytest.mark.parametrize("budget", ["-3", "abc", "0", "nan", "24,", ",", "inf"])
def test_bad_budget_is_a_one_line_value_error(budget):
    if budget == "24,":
        assert plan.check_budgets(budget) == (24.0,)
        return
    with pytest.raises(ValueError) as info:
        plan.check_budgets(budget)
    assert "\n" not in str(info.value) and "budget" in str(info.value)


def test_bad_budget_on_the_command_line_is_one_line():
    out = _main("--mode", "plan", "--config", "configs/ve/ncsnpp_digits.py", "--budget_gb=-3")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: memory budget '-3' is not a positive number of GiB; pass e.g. --budget_gb=24 "
        "or --budget_gb=24,80"], out.stderr


def test_budget_flag_belongs_to_plan_mode(tmp_path):
    out = _main("--mode", "train", "--config", "configs/ve/ncsnpp_digits.py",
                "--budget_gb=24", "--workdir", str(tmp_path))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: --budget_gb applies to --mode plan, not --mode train: drop it"]
