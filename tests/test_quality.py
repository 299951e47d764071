"""--mode eval and --mode ref_stats (run_lib.quality, main.py) on a tiny trained digits run:
eval.json with the protocol, resuming an interrupted evaluation to the same result, two gloo
processes giving the single-process value, an existing .npz measured the same way, and the
bad inputs as one-line errors before any sampling."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from configs.vp.ddpm_digits import get_config
from run_lib import quality
from run_lib.digits_classifier import digits_classifier
from run_lib.fidelity import ReferenceStats
from run_lib.train import train

ROOT = Path(__file__).resolve().parents[1]

#: The tiny run as main.py overrides (the config object of ``tiny_config`` says the same).
OVERRIDES = ["--config.device=cpu", "--config.model.nf=8", "--config.model.dropout=0.0",
             "--config.sampling.ddim.num_steps=3", "--config.eval.num_samples=60",
             "--config.eval.sample_batch=25", "--config.eval.kid_subsets=5",
             "--config.eval.kid_subset_size=30"]


def tiny_config(data_dir):
    config = get_config()
    config.device = "cpu"
    config.data.data_dir = str(data_dir)
    config.model.update(nf=8, dropout=0.0)
    config.training.update(batch_size=16, n_iters=4, log_freq=2, snapshot_freq=100,
                           snapshot_freq_for_preemption=4, sample_freq=0, eval_freq=0)
    config.sampling.ddim.num_steps = 3
    config.eval.update(num_samples=60, sample_batch=25, kid_subsets=5, kid_subset_size=30)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step digits run and a one-epoch digits classifier cached in its data directory."""
    root = tmp_path_factory.mktemp("quality")
    config = tiny_config(root / "data")
    train(config, root / "run", progress=False)
    digits_classifier(root / "data" / "digits_classifier.pt", epochs=1)
    return config, root


def _copy_checkpoints(source, workdir):
    """A fresh work directory holding the trained run's checkpoints."""
    (workdir / "checkpoints").mkdir(parents=True)
    for path in (source / "checkpoints").iterdir():
        (workdir / "checkpoints" / path.name).write_bytes(path.read_bytes())


def _main(*args, env=None):
    return subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _metrics(result: dict) -> dict:
    return {k: result[k] for k in ("fid", "kid", "kid_std", "precision", "recall", "is", "is_std")}


def test_eval_writes_metrics_protocol_picture_and_the_small_n_warning(trained, tmp_path):
    config, root = trained
    workdir = tmp_path / "run"
    _copy_checkpoints(root / "run", workdir)
    result = quality.evaluate(config, workdir, method="ddim", progress=False)
    saved = json.loads((workdir / "eval.json").read_text())
    assert saved == json.loads((workdir / "eval_ddim.json").read_text())
    assert saved["fid"] == pytest.approx(result["fid"]) and saved["fid"] > 0
    assert 0 <= saved["precision"] <= 1 and 0 <= saved["recall"] <= 1 and 1 <= saved["is"] <= 10
    protocol = saved["protocol"]
    assert protocol["num_samples"] == 60 and protocol["chunk_size"] == 25
    assert protocol["weights"] == "ema" and protocol["sampler"] == "ddim"
    assert protocol["sampler_options"]["num_steps"] == 3 and protocol["nfe"] == 4
    assert protocol["feature_extractor"]["name"] == "digits-classifier-v2"
    assert protocol["reference"]["num_images"] == 1500
    assert protocol["reference"]["source"] == "digits:train"
    assert "biased upward" in saved["warning"]
    assert saved["timing"]["chunks"] == 3 and saved["timing"]["chunks_drawn_now"] == 3
    assert (workdir / "eval_ddim.png").is_file()
    assert sorted(p.name for p in (workdir / "eval_ddim").iterdir()) == [
        "chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz"]
    chunk = np.load(workdir / "eval_ddim" / "chunk_00002.npz")
    assert chunk["images"].shape == (10, 1, 8, 8) and chunk["images"].dtype == np.uint8
    assert chunk["features"].shape == (10, 64) and chunk["logits"].shape == (10, 10)


class Interrupted(Exception):
    pass


def test_an_interrupted_evaluation_resumes_to_the_same_result(trained, tmp_path, monkeypatch):
    config, root = trained
    whole = quality.evaluate(config, root / "run", method="ddim", progress=False)
    workdir = tmp_path / "run"
    _copy_checkpoints(root / "run", workdir)
    make_chunk, calls = quality._make_chunk, []

    def stop_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise Interrupted
        calls.append(1)
        return make_chunk(*args, **kwargs)

    monkeypatch.setattr(quality, "_make_chunk", stop_after_two)
    with pytest.raises(Interrupted):
        quality.evaluate(config, workdir, method="ddim", progress=False)
    monkeypatch.setattr(quality, "_make_chunk", make_chunk)
    assert len(list((workdir / "eval_ddim").glob("chunk_*.npz"))) == 2
    (workdir / "eval_ddim" / "chunk_00001.npz").write_bytes(b"damaged by the pre-emption")
    resumed = quality.evaluate(config, workdir, method="ddim", progress=False)
    assert resumed["timing"]["chunks_drawn_now"] == 2           # the missing and the damaged
    assert _metrics(resumed) == _metrics(whole)
    # more samples: the short last chunk (10 of 25) is drawn again at its new size
    more = config.copy_and_resolve_references()
    more.eval.num_samples = 70
    grown = quality.evaluate(more, workdir, method="ddim", progress=False)
    assert grown["timing"]["chunks_drawn_now"] == 1 and grown["num_samples"] == 70
    # another protocol (more steps) draws every chunk again
    config = config.copy_and_resolve_references()
    config.sampling.ddim.num_steps = 4
    other = quality.evaluate(config, workdir, method="ddim", progress=False)
    assert other["timing"]["chunks_drawn_now"] == 3 and other["protocol"]["nfe"] == 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_the_single_process_value(trained, tmp_path):
    config, root = trained
    single = quality.evaluate(config, root / "run", method="ddim", progress=False)
    workdir = tmp_path / "run"
    _copy_checkpoints(root / "run", workdir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "main.py", "--mode", "eval", "--config",
           "configs/vp/ddpm_digits.py", "--workdir", str(workdir), "--sampler", "ddim",
           f"--config.data.data_dir={root / 'data'}", *OVERRIDES]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = json.loads((workdir / "eval.json").read_text())
    assert sharded["protocol"]["world_size"] == 2
    assert _metrics(sharded) == _metrics(single)
    for k in range(3):      # the same pixels, chunk by chunk
        a = np.load(workdir / "eval_ddim" / f"chunk_{k:05d}.npz")["images"]
        b = np.load(root / "run" / "eval_ddim" / f"chunk_{k:05d}.npz")["images"]
        assert np.array_equal(a, b)


def test_an_existing_npz_is_measured_like_the_samples(trained, tmp_path):
    config, root = trained
    result = quality.evaluate(config, root / "run", method="ddim", progress=False)
    images = np.concatenate([np.load(root / "run" / "eval_ddim" / f"chunk_{k:05d}.npz")["images"]
                             for k in range(3)])
    np.savez(tmp_path / "ours.npz", images=images)
    np.savez(tmp_path / "edm.npz", arr_0=images.transpose(0, 2, 3, 1))      # N, H, W, C
    for name in ("ours", "edm"):
        measured = quality.evaluate(config, tmp_path / "out", samples=tmp_path / f"{name}.npz",
                                    progress=False)
        assert _metrics(measured) == _metrics(result)
        assert measured["protocol"]["num_samples"] == 60
        assert (tmp_path / "out" / f"eval_npz_{name}.json").is_file()


def test_ref_stats_mode_and_a_reference_of_another_extractor_is_refused(trained, tmp_path):
    config, root = trained
    done = _main("--mode", "ref_stats", "--config", "configs/vp/ddpm_digits.py", "--workdir",
                 tmp_path / "ref", f"--config.data.data_dir={root / 'data'}",
                 f"--config.eval.ref_stats={tmp_path / 'digits_test.npz'}",
                 "--config.eval.ref_split=test", *OVERRIDES)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "ref" / "ref_stats.json").read_text())
    assert summary["num_images"] == 297 and summary["source"] == "digits:test"
    stats = ReferenceStats.load(tmp_path / "digits_test.npz")
    assert stats.features.shape == (297, 64) and stats.image_shape == (1, 8, 8)
    # the same file with another extractor's identity: refused in one line before sampling
    stats.extractor = {**stats.extractor, "name": "inception-v3", "sha256": "0" * 64}
    stats.save(tmp_path / "other.npz")
    done = _main("--mode", "eval", "--config", "configs/vp/ddpm_digits.py", "--workdir",
                 root / "run", f"--config.data.data_dir={root / 'data'}",
                 f"--config.eval.ref_stats={tmp_path / 'other.npz'}", *OVERRIDES)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "made with feature extractor inception-v3" in done.stderr


def test_bad_inputs_are_one_line_errors_before_any_sampling(trained, tmp_path):
    config, root = trained
    base = ["--workdir", tmp_path / "w", f"--config.data.data_dir={root / 'data'}"]
    cases = [
        (["--mode", "eval", "--config", "configs/vp/ddpm_digits.py", *base,
          "--config.eval.features=inception"], "eval.inception_path"),
        (["--mode", "eval", "--config", "configs/vp/ddpm_digits.py", *base,
          "--config.eval.features=inception", f"--config.eval.inception_path={tmp_path}/no.pt"],
         "no.pt"),
        (["--mode", "eval", "--config", "configs/toy/vp_mixture.py", "--workdir", tmp_path / "w"],
         "needs image data"),
        (["--mode", "eval", "--config", "configs/vp/ddpm_digits.py", *base,
          "--samples", tmp_path / "absent.npz"], "no samples file"),
        (["--mode", "sample", "--config", "configs/vp/ddpm_digits.py", *base,
          "--samples", tmp_path / "absent.npz"], "--samples applies to --mode eval"),
        (["--mode", "eval", "--config", "configs/vp/ddpm_digits.py", *base,
          "--config.eval.num_samples=1"], "eval.num_samples"),
    ]
    for args, expected in cases:
        done = _main(*args)
        assert done.returncode == 1, (args, done.stderr[-2000:])
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert expected in done.stderr, (expected, done.stderr)
    assert not (tmp_path / "w" / "eval.json").exists()
    assert not list(tmp_path.glob("w/eval_*"))


def test_compare_shows_fid_and_is_next_to_bits_per_dim(trained):
    from run_lib.evaluate import compare_workdirs
    config, root = trained
    quality.evaluate(config, root / "run", method="ddim", progress=False)
    table = compare_workdirs([root / "run"])
    assert "ddim: FID / IS (N, NFE)" in table.splitlines()[0]
    assert "(N 60, NFE 4)" in table.splitlines()[2]


def test_chunk_seeds_do_not_depend_on_the_world_size():
    assert quality.chunk_seed(0, 3) == quality.chunk_seed(0, 3) != quality.chunk_seed(1, 3)
    assert len({quality.chunk_seed(s, k) for s in range(3) for k in range(100)}) == 300


def test_reference_of_an_image_folder_equals_that_of_the_same_images_in_an_npz(trained, tmp_path):
    """--mode ref_stats of config.data.name='folder' (PNG files) and of --samples (the same
    uint8 images in an .npz): the same statistics."""
    from PIL import Image
    from run_lib.datasets import load_digits_images
    config, root = trained
    images, _ = load_digits_images("test")
    folder = tmp_path / "pngs" / "train"
    folder.mkdir(parents=True)
    for k, image in enumerate(images[:40]):
        Image.fromarray(image[0]).save(folder / f"{k:03d}.png")
    np.savez(tmp_path / "same.npz", images=images[:40])
    config = config.copy_and_resolve_references()
    config.eval.features = "digits"
    from_folder = config.copy_and_resolve_references()
    from_folder.data.update(name="folder", data_dir=str(tmp_path / "pngs"))
    from_folder.eval.ref_stats = str(tmp_path / "folder_ref.npz")
    # the folder config keeps the digits classifier cache of the run's data directory
    (tmp_path / "pngs" / "digits_classifier.pt").write_bytes(
        (root / "data" / "digits_classifier.pt").read_bytes())
    a = quality.ref_stats(from_folder, tmp_path / "w1", progress=False)
    config.eval.ref_stats = str(tmp_path / "npz_ref.npz")
    b = quality.ref_stats(config, tmp_path / "w2", samples=str(tmp_path / "same.npz"),
                          progress=False)
    assert a["num_images"] == b["num_images"] == 40 and a["source"] == "folder:train"
    first, second = ReferenceStats.load(a["file"]), ReferenceStats.load(b["file"])
    assert torch.equal(first.mean, second.mean) and torch.equal(first.covariance, second.covariance)


def test_class_conditional_eval_reports_the_classifier_accuracy_of_the_labels(trained, tmp_path):
    from configs.vp.ddpm_digits_cond import get_config as cond_config
    _, root = trained
    config = cond_config()
    base = tiny_config(root / "data")
    for group in ("training", "eval"):
        config[group].update(base[group].to_dict())
    config.device, config.data.data_dir = "cpu", str(root / "data")
    config.model.update(nf=8, dropout=0.0)
    config.sampling.ddim.num_steps = 3
    train(config, tmp_path, progress=False)
    result = quality.evaluate(config, tmp_path, method="ddim", progress=False)
    assert 0.0 <= result["class_accuracy"] <= 1.0
    assert result["protocol"]["class_labels"] == "balanced over 10 classes"
    labels = np.load(tmp_path / "eval_ddim" / "chunk_00001.npz")["labels"]
    assert labels.tolist() == [k % 10 for k in range(25, 50)]


def test_eval_with_an_inception_torchscript_file(trained, tmp_path):
    """config.eval.features='inception' with a (fake, scripted) detector file: the same eval
    pipeline, ref_stats first, the extractor's file hash in the protocol; the digits' one
    channel is repeated to RGB."""
    from test_inception import FakeDetector, _save_scripted
    from run_lib.fidelity import file_sha256
    config, root = trained
    detector = _save_scripted(FakeDetector(), tmp_path / "inception-2015-12-05.pt")
    config = config.copy_and_resolve_references()
    config.eval.update(features="inception", inception_path=str(detector))
    with pytest.raises(FileNotFoundError, match="--mode ref_stats"):
        quality.evaluate(config, root / "run", method="ddim", progress=False)
    summary = quality.ref_stats(config, tmp_path / "w", progress=False)
    assert summary["feature_extractor"]["num_features"] == 2048
    result = quality.evaluate(config, root / "run", method="ddim", progress=False)
    identity = result["protocol"]["feature_extractor"]
    assert identity["sha256"] == file_sha256(detector) and "torchscript" in identity["name"]
    assert result["fid"] >= 0 and result["is"] >= 1
