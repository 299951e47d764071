"""Sample and likelihood modes at scale (run_lib.evaluate with run_lib.chunks): seeded chunks
of config.sampling.batch_size / config.eval.batch_size, resumed after an interruption and a
damaged chunk, sharded over two gloo processes under torchrun with the single process's
pixels and values, and the samples streamed to disk without a tensor of all N images.

A randomly initialised tiny digits U-Net (nf=8) stands in for a trained one: the samples are
noise-like but deterministic, which is all these tests compare."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models
import samplers
from configs.vp.ddpm_digits import get_config
from run_lib import compose, evaluate

ROOT = Path(__file__).resolve().parents[1]

#: main.py's overrides for the config of ``tiny_config``.
OVERRIDES = ["--config.device=cpu", "--config.model.nf=8", "--config.model.dropout=0.0",
             "--config.sampling.num_samples=6", "--config.sampling.batch_size=2",
             "--config.sampling.ddim.num_steps=2", "--config.eval.likelihood_samples=5",
             "--config.eval.batch_size=2", "--config.eval.ode_method=rk4",
             "--config.eval.num_steps=2", "--config.eval.vlb_levels=2"]


def tiny_config():
    config = get_config()
    config.device = "cpu"
    config.model.update(nf=8, dropout=0.0)
    config.sampling.update(num_samples=6, batch_size=2, method="ddim")
    config.sampling.ddim.num_steps = 2
    config.eval.update(likelihood_samples=5, batch_size=2, ode_method="rk4", num_steps=2,
                       vlb_levels=2)
    return config


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A checkpoint file of a randomly initialised tiny model (EMA = the weights)."""
    path = tmp_path_factory.mktemp("weights") / "weights.pt"
    torch.manual_seed(0)
    net = compose.build_model(tiny_config())
    ema = models.ExponentialMovingAverage(net, decay=0.9)
    torch.save({"model": net.state_dict(), "ema": ema.state_dict(), "step": 3}, path)
    return str(path)


def _images(workdir, method="ddim"):
    return np.load(Path(workdir) / f"samples_{method}.npz")["images"]


def _direct_chunk(config, weights, k, size):
    """Chunk k drawn by hand: one compose.sample call from the chunk's seed."""
    run = evaluate.load_score_fn(config, None, "cpu", checkpoint=weights)
    generator = torch.Generator().manual_seed(evaluate.sample_chunk_seed(config.seed, k))
    with torch.no_grad():
        x = compose.sample(config, run.score_fn, run.sde, (size, 1, 8, 8), method="ddim",
                           generator=generator, device="cpu").x
    return evaluate.to_uint8(x, centered=True).numpy()


def test_samples_are_chunks_with_their_own_seeds(weights, tmp_path):
    """N = 6 in chunks of 2 are the three chunks drawn alone from seeds s + 10 + 10^6 k; N = 4
    gives the first 4 of them; one chunk (batch_size 0) is the draw from seed s + 10 that
    sample mode made before chunks."""
    config = tiny_config()
    metrics = evaluate.sample(config, tmp_path / "a", progress=False, checkpoint=weights)
    images = _images(tmp_path / "a")
    assert images.shape == (6, 1, 8, 8) and metrics["chunks"]["count"] == 3
    expected = np.concatenate([_direct_chunk(config, weights, k, 2) for k in range(3)])
    assert np.array_equal(images, expected)
    assert not np.array_equal(images[:2], images[2:4])
    assert sorted(p.name for p in (tmp_path / "a" / "samples_ddim").iterdir()) == [
        "chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz"]
    fewer = tiny_config()
    fewer.sampling.num_samples = 4
    evaluate.sample(fewer, tmp_path / "b", progress=False, checkpoint=weights)
    assert np.array_equal(_images(tmp_path / "b"), images[:4])
    whole = tiny_config()
    whole.sampling.batch_size = 0
    evaluate.sample(whole, tmp_path / "c", progress=False, checkpoint=weights)
    assert config.seed + 10 == evaluate.sample_chunk_seed(config.seed, 0)
    assert np.array_equal(_images(tmp_path / "c"), _direct_chunk(config, weights, 0, 6))


class Interrupted(Exception):
    pass


def test_interrupted_sampling_resumes_to_the_same_samples(weights, tmp_path, monkeypatch):
    config = tiny_config()
    evaluate.sample(config, tmp_path / "whole", progress=False, checkpoint=weights)
    draw, calls = evaluate._draw_chunk, []

    def stop_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise Interrupted
        calls.append(1)
        return draw(*args, **kwargs)

    workdir = tmp_path / "run"
    monkeypatch.setattr(evaluate, "_draw_chunk", stop_after_two)
    with pytest.raises(Interrupted):
        evaluate.sample(config, workdir, progress=False, checkpoint=weights)
    monkeypatch.setattr(evaluate, "_draw_chunk", draw)
    chunks = workdir / "samples_ddim"
    assert sorted(p.name for p in chunks.glob("chunk_*.npz")) == ["chunk_00000.npz",
                                                                  "chunk_00001.npz"]
    assert not (workdir / "samples_ddim.npz").exists()
    (chunks / "chunk_00001.npz").write_bytes(b"damaged by the pre-emption")
    resumed = evaluate.sample(config, workdir, progress=False, checkpoint=weights)
    assert resumed["chunks"]["drawn_now"] == 2             # the missing and the damaged one
    assert np.array_equal(_images(workdir), _images(tmp_path / "whole"))
    again = evaluate.sample(config, workdir, progress=False, checkpoint=weights)
    assert again["chunks"]["drawn_now"] == 0 and again["nfe"] == resumed["nfe"] == 3
    other = tiny_config()
    other.sampling.ddim.num_steps = 3                       # another protocol: all redrawn
    assert evaluate.sample(other, workdir, progress=False,
                           checkpoint=weights)["chunks"]["drawn_now"] == 3


def test_large_samples_are_streamed_without_a_tensor_of_all_images(weights, tmp_path,
                                                                     monkeypatch):
    """With the images counted as large (MAX_PIXEL_FD_DIM = 0) and a picture of at most 2,
    every concatenation or stack of images that sample mode makes (torch.cat / stack,
    np.concatenate / stack, anywhere in the process) holds at most one chunk (2 images) of
    N = 6, and the streamed .npz holds the same 6 images as the in-memory path."""
    config = tiny_config()
    evaluate.sample(config, tmp_path / "small", progress=False, checkpoint=weights)
    monkeypatch.setattr(evaluate, "MAX_PIXEL_FD_DIM", 0)
    monkeypatch.setattr(evaluate, "MAX_PICTURE_IMAGES", 2)
    largest = []

    def record(function):
        def wrapped(*args, **kwargs):
            out = function(*args, **kwargs)
            if getattr(out, "ndim", 0) == 4:
                largest.append(out.shape[0])
            return out
        return wrapped

    for module, name in ((torch, "cat"), (torch, "stack"), (np, "concatenate"), (np, "stack")):
        monkeypatch.setattr(module, name, record(getattr(module, name)))
    metrics = evaluate.sample(config, tmp_path / "large", progress=False, checkpoint=weights)
    monkeypatch.undo()
    assert largest and max(largest) <= 2, largest
    assert np.array_equal(_images(tmp_path / "large"), _images(tmp_path / "small"))
    assert "pixel FD is computed up to 0" in metrics["skipped"]["pixel_fd_to_test"]
    # the in-memory path of draw_samples does make the (6, ...) tensor the test looks for
    largest.clear()
    monkeypatch.setattr(torch, "cat", record(torch.cat))
    run = evaluate.load_score_fn(config, None, "cpu", checkpoint=weights)
    evaluate.draw_samples(config, run, "ddim", device="cpu", progress=False)
    assert max(largest) == 6


def test_likelihood_chunks_have_their_own_seeds_and_resume(weights, tmp_path):
    """Likelihood in chunks of 2 (5 images): chunk k's bits/dim are samplers.bits_per_dim of
    its rows from seed s + 12 + 10^6 k; chunk 0 alone (batch_size 0 of 2 images) gives the
    same values; a damaged chunk is computed again to the same result."""
    config = tiny_config()
    config.eval.vlb = False
    result = evaluate.likelihood(config, tmp_path / "run", progress=False, checkpoint=weights)
    assert result["nfe_per_batch"] == [8, 8, 8] and result["num_images"] == 5
    folder = tmp_path / "run" / "likelihood"
    run = evaluate.load_score_fn(config, None, "cpu", checkpoint=weights)
    from run_lib.datasets import build_dataset
    test = build_dataset(config, "test").images
    values = []
    for k, rows in enumerate((slice(0, 2), slice(2, 4), slice(4, 5))):
        chunk = np.load(folder / f"chunk_{k:05d}.npz")["bpd"]
        generator = torch.Generator().manual_seed(evaluate.likelihood_chunk_seed(config.seed, k))
        expected = samplers.bits_per_dim(run.score_fn, run.sde, test[rows], centered=True,
                                         generator=generator, **evaluate.ode_options(config)).bpd
        np.testing.assert_allclose(chunk, expected.double().numpy(), rtol=1e-6)
        values.append(chunk)
    assert result["bits_per_dim"] == pytest.approx(np.concatenate(values).mean(), rel=1e-12)
    one = tiny_config()
    one.eval.update(vlb=False, likelihood_samples=2, batch_size=0)
    alone = evaluate.likelihood(one, tmp_path / "one", progress=False, checkpoint=weights)
    assert alone["bits_per_dim"] == pytest.approx(values[0].mean(), rel=1e-6)
    (folder / "chunk_00001.npz").write_bytes(b"PK damaged")
    resumed = evaluate.likelihood(config, tmp_path / "run", progress=False, checkpoint=weights)
    assert resumed["chunks"]["computed_now"] == 1
    assert resumed["bits_per_dim"] == pytest.approx(result["bits_per_dim"], rel=1e-6)


def test_deterministic_likelihood_in_batches_equals_one_batch(tmp_path):
    """The toy mixture's exact-trace ODE on a fixed RK4 grid has no randomness: batches of 3
    give the NLL of one batch of all 10 points (up to float rounding)."""
    from configs.toy.vp_mixture import get_config as toy_config
    config = toy_config()
    config.device = "cpu"
    config.model.update(hidden_dim=16, num_blocks=1, embedding_dim=8)
    config.eval.update(likelihood_samples=10, batch_size=3, trace="exact", ode_method="rk4",
                       num_steps=3)
    torch.manual_seed(0)
    net = compose.build_model(config)
    ema = models.ExponentialMovingAverage(net, decay=0.9)
    torch.save({"model": net.state_dict(), "ema": ema.state_dict(), "step": 1},
               tmp_path / "toy.pt")
    batched = evaluate.likelihood(config, tmp_path / "b", progress=False,
                                  checkpoint=str(tmp_path / "toy.pt"))
    config.eval.batch_size = 0
    whole = evaluate.likelihood(config, tmp_path / "w", progress=False,
                                checkpoint=str(tmp_path / "toy.pt"))
    assert batched["chunks"]["count"] == 4 and whole["chunks"]["count"] == 1
    a = np.concatenate([np.load(tmp_path / "b" / "likelihood" / f"chunk_{k:05d}.npz")["logp"]
                        for k in range(4)])
    b = np.load(tmp_path / "w" / "likelihood" / "chunk_00000.npz")["logp"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert batched["nll_nats"] == pytest.approx(whole["nll_nats"], abs=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_the_single_process_samples_and_likelihood(weights, tmp_path):
    config = tiny_config()
    single = tmp_path / "single"
    evaluate.sample(config, single, progress=False, checkpoint=weights)
    like = evaluate.likelihood(config, single, progress=False, checkpoint=weights)
    assert "vlb" in like and like["vlb"]["kl_levels"] == 2
    workdir = tmp_path / "sharded"
    for mode in ("sample", "likelihood"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={_free_port()}", "main.py", "--mode", mode, "--config",
               "configs/vp/ddpm_digits.py", "--workdir", str(workdir), "--checkpoint", weights,
               *OVERRIDES] + (["--sampler", "ddim"] if mode == "sample" else [])
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
    assert np.array_equal(_images(workdir), _images(single))        # the same pixels
    sharded = json.loads((workdir / "samples_ddim.json").read_text())
    assert sharded["chunks"]["world_size"] == 2 and sharded["chunks"]["drawn_now"] == 3
    sharded_like = json.loads((workdir / "likelihood.json").read_text())
    assert sharded_like["chunks"]["world_size"] == 2
    for key in ("bits_per_dim", "bits_per_dim_standard_error", "nfe_per_batch"):
        assert sharded_like[key] == like[key], key
    assert sharded_like["vlb"]["bits_per_dim"] == like["vlb"]["bits_per_dim"]
    assert sharded_like["vlb"]["terms_bits_per_dim"] == like["vlb"]["terms_bits_per_dim"]
