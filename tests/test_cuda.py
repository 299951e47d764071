"""Checks that need a CUDA GPU (marker ``cuda``; every test here is skipped without one).
bench/gpu.sh runs them first: ``pytest -m cuda tests/test_cuda.py``.

* a bf16 (autocast) training step of NCSN++ runs and its loss is close to fp32's;
* no host-device synchronisation inside the training loop's step (train_step, the data
  loader's pinned copy, the scheduled actions between log steps);
* the CUDA RNG state (dropout) is in the checkpoint, and a run interrupted and resumed
  equals the uninterrupted one, while the same resume without that state does not;
* DistributedDataParallel over nccl on the GPUs present (several: torchrun of main.py
  against one process; one GPU: a one-process nccl group, DDP gradients = plain ones);
* torch.compile of NCSN++ gives eager's output.

The network is a small NCSN++ (nf 32, 2 residual blocks per level, otherwise the CIFAR-10
NCSN++ cont. topology: FIR resampling, residual progressive input, Fourier embedding,
attention at 16 x 16) with init_scale 1 instead of 0, so that its output is not ~0 and
relative comparisons mean something. Heavy imports happen inside the tests: without CUDA
this module costs the collection of torch only.
"""
import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
import traceback
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def small_ncsnpp_config(batch: int = 16, mixed_precision: str = "no"):
    from configs.ve.ncsnpp_cifar import get_config
    config = get_config()
    config.device = "cuda"
    config.model.nf = 32
    config.model.num_res_blocks = 2
    config.model.dropout = 0.0
    config.model.init_scale = 1.0
    config.training.batch_size = batch
    config.training.mixed_precision = mixed_precision
    return config


def step_setup(config, *, seed: int = 0):
    """(state, objective, x, labels) for train_step on random [0, 1] images."""
    from run_lib import compose
    from run_lib.state import build_train_state
    from run_lib.train import DistContext, Objective
    device, ctx = torch.device("cuda"), DistContext()
    state = build_train_state(config, device, ctx)
    objective = Objective(config, compose.build_sde(config), state.model, ctx, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    size = int(config.data.image_size)
    x = torch.rand((int(config.training.batch_size), 3, size, size), generator=generator,
                   device=device)
    labels = torch.zeros(x.shape[0], dtype=torch.long, device=device)
    state.model.train()
    return state, objective, x, labels


def test_bf16_step_close_to_fp32():
    """One step from the same weights, times and noise: the bf16-autocast loss is within 2 %
    of fp32's (bf16 keeps 8 significant bits, a relative rounding of 2^-9 = 0.2 % per
    operation; the loss is a mean of 16 x 3072 squares, whose errors partly cancel), and not
    equal to it (autocast ran). Gradient norms within 5 %; the updated weights finite."""
    from run_lib.train import train_step
    results = {}
    for precision in ("no", "bf16"):
        state, objective, x, labels = step_setup(small_ncsnpp_config(mixed_precision=precision))
        stats = train_step(state, x, labels, objective)
        results[precision] = (float(stats.loss), float(stats.grad_norm), bool(stats.bad))
        assert all(torch.isfinite(p).all() for p in state.model.parameters())
    (loss32, grad32, bad32), (loss16, grad16, bad16) = results["no"], results["bf16"]
    assert not bad32 and not bad16
    assert loss16 != loss32
    assert loss16 == pytest.approx(loss32, rel=2e-2), results
    assert grad16 == pytest.approx(grad32, rel=5e-2), results


def _digits_loop(tmp_path):
    """The training loop's body on the digits config (run_lib.train._run without the loop):
    batches from the real data pipeline (pinned, non-blocking copies), train_step,
    ScheduledActions.after_step with every action far away."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train import tiny_config
    from run_lib import compose
    from run_lib.datasets import build_dataset
    from run_lib.state import build_train_state
    from run_lib.train import (DistContext, Objective, ScheduledActions, batches_forever,
                               train_step)
    config = tiny_config(1000)
    config.device = "cuda"
    config.training.log_freq = config.training.snapshot_freq = 1000
    config.training.snapshot_freq_for_preemption = 1000
    config.training.eval_freq = 0
    config.training.sample_freq = 0
    device, ctx = torch.device("cuda"), DistContext()
    state = build_train_state(config, device, ctx)
    sde = compose.build_sde(config)
    objective = Objective(config, sde, state.model, ctx, device)
    batches = batches_forever(build_dataset(config, "train"), config, 0, device, ctx)
    actions = ScheduledActions(config, tmp_path, state, sde, None, progress=False)
    state.model.train()

    def step():
        x, labels = next(batches)
        actions.after_step(state, train_step(state, x, labels, objective))
    return step, actions.close


@pytest.mark.parametrize("case", ["ncsnpp_fp32", "ncsnpp_bf16", "digits_loop"])
def test_no_host_sync_per_training_step(case, tmp_path):
    """Three steps after two warm-up steps under torch.cuda.set_sync_debug_mode('warn'):
    no synchronising CUDA call (a .item(), a device-to-host copy, a pageable host-to-device
    copy, a stream synchronisation). On failure, one more step in 'error' mode shows where."""
    from run_lib.train import train_step
    close = None
    if case == "digits_loop":
        step, close = _digits_loop(tmp_path)
    else:
        config = small_ncsnpp_config(mixed_precision="bf16" if case.endswith("bf16") else "no")
        state, objective, x, labels = step_setup(config)

        def step():
            train_step(state, x, labels, objective)
    try:
        step()
        step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(3):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
        where = ""
        if syncs:
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            except RuntimeError:
                where = traceback.format_exc()[-3000:]
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert not syncs, f"{len(syncs)} synchronising calls in 3 steps: {syncs[:3]}\n{where}"
    finally:
        if close is not None:
            close()


def _digits_config(n_iters: int):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train import tiny_config
    config = tiny_config(n_iters)
    config.device = "cuda"
    config.model.dropout = 0.1          # dropout draws from the global CUDA RNG
    config.training.eval_freq = 0
    return config


def _weights(workdir):
    from run_lib.train import load_checkpoint
    return load_checkpoint(Path(workdir) / "checkpoints" / "latest.pt", "cpu")


def test_cuda_rng_state_saved_and_resume_reproduces(tmp_path):
    """6 steps in one run vs 4 steps + resume to 6, dropout 0.1, cuDNN deterministic: the
    checkpoint at step 4 holds the CUDA RNG state, and the resumed run's weights equal the
    uninterrupted run's (max difference <= 1e-6). Control: the same resume from a
    checkpoint whose CUDA RNG state was removed (the generator then restarts from the seed,
    other dropout masks) ends more than 1e-4 away, so the comparison can fail."""
    kept = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        _resume_runs(tmp_path)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = kept


def _resume_runs(tmp_path):
    from run_lib.train import train
    train(_digits_config(6), tmp_path / "full", progress=False)
    train(_digits_config(4), tmp_path / "resumed", progress=False)
    at_4 = _weights(tmp_path / "resumed")
    assert at_4["step"] == 4
    assert "cuda" in at_4["rng"] and at_4["rng"]["cuda"].dtype == torch.uint8
    # the control: a copy of the step-4 run without the CUDA RNG state
    control = tmp_path / "control" / "checkpoints"
    control.mkdir(parents=True)
    stripped = copy.deepcopy(at_4)
    del stripped["rng"]["cuda"]
    torch.save(stripped, control / "latest.pt")
    train(_digits_config(6), tmp_path / "resumed", progress=False)
    train(_digits_config(6), tmp_path / "control", progress=False)
    full, resumed, no_rng = (_weights(tmp_path / name)["model"]
                             for name in ("full", "resumed", "control"))

    def max_diff(a, b):
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert max_diff(full, resumed) <= 1e-6
    assert max_diff(full, no_rng) > 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ONE_GPU_DDP = textwrap.dedent("""
    import copy, json, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from run_lib import compose
    from run_lib.distributed import NetworkForward
    from configs.ve.ncsnpp_cifar import get_config
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    config = get_config()
    config.model.update(nf=32, num_res_blocks=2, dropout=0.0, init_scale=1.0)
    torch.manual_seed(0)
    model = compose.build_model(config).cuda()
    plain = copy.deepcopy(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
    x = torch.randn(8, 3, 32, 32, device="cuda")
    sigma = torch.rand(8, device="cuda") * 50 + 0.01
    outputs = []
    for net in (ddp, plain):
        out = NetworkForward(net)(x, sigma)
        out.square().mean().backward()
        outputs.append(out.detach())
    rel = max(float((a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-30))
              for a, b in zip(model.parameters(), plain.parameters()) if b.grad is not None)
    t = torch.full((1,), 3.0, device="cuda")
    dist.all_reduce(t)
    print(json.dumps({"backend": dist.get_backend(), "world": dist.get_world_size(),
                      "grad_rel": rel, "out_equal": bool(torch.equal(*outputs)),
                      "all_reduce": float(t)}))
    dist.destroy_process_group()
""")


def test_ddp_nccl():
    """Several GPUs: torchrun of main.py (one process per GPU, nccl), 2 steps on the digits
    config, losses equal to one process's (rel 1e-4: float summation order). One GPU: one
    process in an nccl group of one; DDP's output equals the plain model's and its
    gradients match (relative 1e-5; the bucketed all-reduce over one rank divides by 1)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    count = torch.cuda.device_count()
    if count == 1:
        done = subprocess.run([sys.executable, "-c", ONE_GPU_DDP, str(ROOT)], cwd=ROOT,
                              capture_output=True, text=True, timeout=240, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["backend"] == "nccl" and result["world"] == 1
        assert result["out_equal"] and result["all_reduce"] == 3.0
        assert result["grad_rel"] <= 1e-5, result
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from test_ddp import tensorboard_scalars
    from run_lib.train import train
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        ddp = Path(folder) / "ddp"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={count}",
               f"--master_port={_free_port()}", "main.py", "--mode", "train",
               "--config", "configs/vp/ddpm_digits.py", "--workdir", str(ddp),
               "--config.training.n_iters=2", "--config.device=cuda", "--config.model.nf=16",
               "--config.model.dropout=0.0", f"--config.training.batch_size={8 * count}",
               "--config.training.log_freq=1", "--config.training.eval_freq=0",
               "--config.training.snapshot_freq=4",
               "--config.training.snapshot_freq_for_preemption=2", "--config.optim.warmup=5"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                              env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        config = _digits_config(2)
        config.model.nf, config.model.dropout = 16, 0.0
        config.training.batch_size = 8 * count
        single = train(config, Path(folder) / "single", progress=False)
        losses = tensorboard_scalars(ddp / "tensorboard", "train/loss")
        assert [losses[s] for s in sorted(losses)] == pytest.approx(single["losses"], rel=1e-4)


def test_compile_matches_eager():
    """torch.compile (Inductor) of the small NCSN++ in eval mode: output within relative
    (Frobenius) 1e-4 of eager on 8 images, TF32 off in both (then only the order of float32
    reductions differs, ~1e-6), and the output is not ~0 (init_scale 1)."""
    from run_lib import compose
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        model = compose.build_model(small_ncsnpp_config()).cuda().eval()
        x = torch.randn(8, 3, 32, 32, device="cuda")
        sigma = torch.rand(8, device="cuda") * 50 + 0.01
        with torch.no_grad():
            eager = model(x, sigma)
            compiled = torch.compile(model)(x, sigma)
        assert float(eager.abs().mean()) > 1e-3
        rel = float((compiled - eager).norm() / eager.norm())
        assert rel <= 1e-4, rel
    finally:
        torch.backends.cudnn.allow_tf32 = True
