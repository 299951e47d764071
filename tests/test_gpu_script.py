"""bench/gpu.sh --dry-run on the CPU: every section of the GPU benchmark reports ok or skipped
(with its reason) and numbers that could have been wrong (NFE counts, FLOPs, the official
network's size, the memory extrapolation); a section over its limit is killed and marked
timeout. The official-code section is skipped when bench/official is absent (CI: it is
git-ignored and fetched by bench/get_official.sh), and says so."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["official_step", "dpm_solver", "pc_sample", "bits_per_dim", "memory_plan",
            "train_step", "cuda_tests"]        # the order they run in


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), out, done.stdout


def test_every_section_ok_or_skipped(dry_run):
    report, out, stdout = dry_run
    import torch
    assert report["dry_run"] is True
    assert report["env"]["torch"] == torch.__version__
    assert list(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["status"] in ("ok", "skipped"), (name, section)
        assert section["seconds"] <= section["limit_s"]
        if section["status"] == "skipped":
            assert section.get("reason"), name
    assert report["total_seconds"] < report["budget_s"]
    table = out.with_suffix(".md").read_text()
    assert "| section | status |" in table and table.strip() in stdout


def test_cuda_tests_collected_and_skipped_without_cuda(dry_run):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the tests instead")
    section = dry_run[0]["sections"]["cuda_tests"]
    assert section["status"] == "skipped" and "no CUDA" in section["reason"]
    tests = section["results"]["tests"]
    assert len(tests) == 7 and set(tests.values()) == {"SKIPPED"}
    assert "test_compile_matches_eager" in tests and "test_ddp_nccl" in tests


def test_train_step_rows(dry_run):
    results = dry_run[0]["sections"]["train_step"]["results"]
    assert results["flops_per_step"] > 0 and results["parameters"] > 0
    for key in ("fp32", "bf16", "bf16+channels_last"):
        row = results[key]
        assert row["status"] == "ok" and row["images_per_s"] > 0 and math.isfinite(row["loss"])
        assert row["tflops_per_s"] == pytest.approx(
            results["flops_per_step"] / (row["step_ms"] / 1e3) / 1e12, rel=0.05, abs=1e-3)
    assert results["bf16+compile+channels_last"]["status"] == "skipped"
    assert results["fp32"]["loss"] != results["bf16"]["loss"]      # autocast did something


def test_official_step_same_network_or_skipped(dry_run):
    """With bench/official present: their NCSN++ has exactly our parameter count and the
    same FLOPs per step within 1 % (the same architecture); absent: skipped, saying why."""
    sections = dry_run[0]["sections"]
    section = sections["official_step"]
    if not (ROOT / "bench" / "official" / "score_sde_pytorch" / "losses.py").exists():
        assert section["status"] == "skipped" and "get_official.sh" in section["reason"]
        return
    results, ours = section["results"], sections["train_step"]["results"]
    assert section["status"] == "ok" and results["fp32"]["images_per_s"] > 0
    assert results["parameters"] == ours["parameters"]
    assert results["flops_per_step"] == pytest.approx(ours["flops_per_step"], rel=0.01)


def test_sampling_sections_count_nfe(dry_run):
    sections = dry_run[0]["sections"]
    pc = sections["pc_sample"]["results"]
    assert pc["fp32"]["nfe"] == 2 * pc["setting"]["steps"] and pc["fp32"]["finite"]
    assert pc["bf16_autocast_short"]["seconds_extrapolated_all_steps"] > 0
    dpm = sections["dpm_solver"]["results"]
    assert dpm["fp32"]["nfe"] == dpm["setting"]["num_steps"] + 1
    assert len(dpm["fp32"]["runs"]) == 3 and dpm["fp32"]["seconds"] > 0
    bpd = sections["bits_per_dim"]["results"]["fp32"]
    assert bpd["status"] == "ok" and bpd["nfe"] > 6 and bpd["finite"] and bpd["bpd_mean"] > 0


def test_memory_plan_extrapolation(dry_run):
    """On the CPU the activations are the bytes saved for backward: linear in the batch, so
    batch 1 and 2 predict batch 4 within 5 %; the CUDA measurement is reported as skipped."""
    results = dry_run[0]["sections"]["memory_plan"]["results"]
    at = results["at_batch"]
    assert at["batch"] == 4 and at["measured_bytes"] > 0
    assert abs(at["relative_error"]) < 0.05
    assert "skipped" in results["cuda_measurement"]
    assert "plan_hook" in results


def load_gpu_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    return gpu


def test_official_section_skipped_without_the_copy(tmp_path):
    """As in CI (bench/official is git-ignored): skipped, naming bench/get_official.sh."""
    gpu = load_gpu_module()
    gpu.OFFICIAL = tmp_path / "absent" / "score_sde_pytorch"
    entry = gpu.spawn_section("official_step", True, 60, tmp_path)
    assert entry["status"] == "skipped" and "get_official.sh" in entry["reason"], entry


def test_section_over_its_limit_is_killed(tmp_path):
    """A section given 0.5 s is killed with its process group and reported as timeout."""
    gpu = load_gpu_module()
    entry = gpu.spawn_section("bits_per_dim", True, 0.5, tmp_path)
    # the kill itself is prompt; under a loaded CI machine process start-up and teardown can
    # take seconds, so only the status and a generous bound are checked
    # 'partial': the section stopped itself at its inner deadline first (bench/gpu.py)
    assert entry["status"] in ("timeout", "partial") and entry["seconds"] < 60, entry
