"""Training on built-in toy distributions with a closed-form score (2-D mixture, Gaussian).

Because the exact score of every perturbed marginal is known, the run reports how far the
learned score is from it, not only the loss.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

import torch
from tqdm.auto import tqdm

import models
import samplers
import sde_lib

from .utils import pick_device, save_atomic, write_config

__all__ = ["relative_score_error", "train_toy", "sample_toy", "likelihood_toy", "load_toy_model",
           "scatter_image"]

log = logging.getLogger(__name__)


@torch.no_grad()
def relative_score_error(score_fn, data: sde_lib.GaussianMixture, sde: sde_lib.SDE, *,
                         num_samples: int = 8192, eps: float = 1e-3,
                         generator: torch.Generator | None = None, device=None) -> float:
    """E ||std (s - s*)||^2 / E ||std s*||^2 over t ~ U(eps, T) and x_t ~ p_t.

    s* is the exact score of the perturbed data; the std weighting is that of the default DSM
    loss (0 for the exact score; 1 for the zero function). A dimensionless number.
    """
    x0 = data.sample(num_samples, generator=generator, dtype=torch.float32, device=device)
    u = torch.rand(num_samples, generator=generator, dtype=torch.float64).to(x0.device)
    t = (eps + (sde.T - eps) * u).to(x0.dtype)
    mean, std = sde.marginal_prob(x0, t)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    std = sde_lib.append_dims(std, x0.ndim)
    x_t = mean + std * noise
    exact = data.marginal_score(sde, x_t, t)
    error = ((score_fn(x_t, t) - exact) * std).square().sum()
    return (error / (exact * std).square().sum()).item()


def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def train_toy(config, workdir, *, progress: bool = True) -> dict:
    """Train ``config.model`` on the toy distribution ``config.data.name`` with the DSM loss.

    Writes config.json, TensorBoard scalars (loss, lr, grad norm, score error),
    model.pt (weights, written atomically) and metrics.json into ``workdir``.
    Returns the final metrics: loss, the exact score's loss on the same draws, score error.
    """
    workdir = Path(workdir)
    write_config(config, workdir)
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    data_gen = torch.Generator().manual_seed(config.seed)
    noise_gen = torch.Generator(device=device).manual_seed(config.seed + 1)

    data = sde_lib.toy_distribution(config.data.name)
    sde = sde_lib.build_sde(config)
    model = models.build_model(config).to(device)
    score_fn = models.build_score_fn(config, sde, model)
    loss_fn = sde_lib.build_loss_fn(config, sde)
    exact_score = data.score_fn(sde)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr,
                                 betas=(config.optim.beta1, 0.999), eps=config.optim.eps,
                                 weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, config.optim.warmup))

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(workdir / "tensorboard"))
    bar = tqdm(range(config.training.n_iters), disable=not progress, desc="train", unit="step")
    for step in bar:
        x = data.sample(config.training.batch_size, generator=data_gen, device=device)
        loss = loss_fn(score_fn, x, generator=noise_gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        if step % config.training.log_freq == 0 or step == config.training.n_iters - 1:
            loss_value = loss.item()
            writer.add_scalar("train/loss", loss_value, step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
            writer.add_scalar("train/grad_norm", grad_norm.item(), step)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            log.info("step %d loss %.5f", step, loss_value)

    eval_gen = torch.Generator().manual_seed(config.seed + 2)
    eval_x = data.sample(config.eval.num_samples, generator=eval_gen, device=device)
    model.eval()
    with torch.no_grad():
        loss_gen = torch.Generator(device=device)
        final_loss = loss_fn(score_fn, eval_x, generator=loss_gen.manual_seed(3)).item()
        exact_loss = loss_fn(exact_score, eval_x, generator=loss_gen.manual_seed(3)).item()
    error = relative_score_error(score_fn, data, sde, num_samples=config.eval.num_samples,
                                 eps=config.eval.eps, generator=eval_gen, device=device)
    writer.add_scalar("eval/relative_score_error", error, config.training.n_iters)
    writer.close()
    metrics = {"steps": config.training.n_iters, "loss": final_loss, "exact_score_loss": exact_loss,
               "relative_score_error": error, "sde": repr(sde)}
    save_atomic({"model": model.state_dict(), "step": config.training.n_iters},
                workdir / "model.pt")
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def load_toy_model(config, workdir, device):
    """The trained network of ``workdir/model.pt`` (weights only, strict), in eval mode."""
    path = Path(workdir) / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"no trained weights at {path}: run --mode train with this "
                                "--workdir first")
    state = torch.load(path, map_location=device, weights_only=True)
    model = models.build_model(config).to(device)
    model.load_state_dict(state["model"], strict=True)
    return model.eval()


def scatter_image(points: torch.Tensor, size: int = 512, extent: float = 3.5) -> np.ndarray:
    """A (size, size, 3) uint8 scatter plot of 2-D points in [-extent, extent]^2."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    pixels = ((points.double().cpu() + extent) / (2 * extent) * (size - 1)).numpy()
    for px, py in pixels:
        draw.point((float(px), float(size - 1 - py)), fill=(20, 60, 160))
    return np.asarray(image)


def _mode_weights(data: sde_lib.GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    nearest = torch.cdist(x.double().cpu(), data.means).argmin(dim=1)
    return torch.bincount(nearest, minlength=data.num_components).double() / x.shape[0]


def sample_toy(config, workdir, *, method: str | None = None, progress: bool = True) -> dict:
    """Sample the trained toy model with ``config.sampling`` (``method`` overrides its method).

    Writes samples_<method>.npz, samples_<method>.png (scatter plot, also to TensorBoard) and
    samples_<method>.json with NFE, seconds, the mean true log-density of the samples (vs that
    of true data: lower means samples off the data) and, for mixtures, the total variation
    between the samples' nearest-mode frequencies and the mixture weights.
    """
    workdir = Path(workdir)
    device = pick_device(config.device)
    method = method or config.sampling.method
    data = sde_lib.toy_distribution(config.data.name)
    sde = sde_lib.build_sde(config)
    score_fn = models.build_score_fn(config, sde, load_toy_model(config, workdir, device))
    generator = torch.Generator(device=device).manual_seed(config.seed + 10)
    n = config.sampling.num_samples
    start = time.perf_counter()
    with torch.no_grad():
        result = samplers.sample_from_config(config.sampling, score_fn, sde, (n, *models.data_shape(config)),
                                             generator=generator, device=device,
                                             progress=progress, method=method)
    seconds = time.perf_counter() - start
    x = result.x.cpu()
    true_x = data.sample(n, generator=torch.Generator().manual_seed(config.seed + 11))
    metrics = {"sampler": method, "nfe": result.nfe, "seconds": round(seconds, 3),
               "mean_true_logp_of_samples": data.log_prob(x).mean().item(),
               "mean_true_logp_of_data": data.log_prob(true_x).mean().item()}
    if data.num_components > 1:
        tv = 0.5 * (_mode_weights(data, x) - data.weights).abs().sum().item()
        metrics["mode_weight_tv"] = tv
    np.savez_compressed(workdir / f"samples_{method}.npz", samples=x.numpy())
    if x.shape[1:] == (2,):
        from PIL import Image
        picture = scatter_image(x)
        Image.fromarray(picture).save(workdir / f"samples_{method}.png")
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(str(workdir / "tensorboard")) as writer:
            writer.add_image(f"samples/{method}", picture, dataformats="HWC")
    (workdir / f"samples_{method}.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def likelihood_toy(config, workdir, *, progress: bool = True) -> dict:
    """Log-likelihood of held-out toy data through the probability-flow ODE, next to the true
    log-density of the same points; writes likelihood.json. logp is that of p_eps with
    eps = config.eval.likelihood_eps (the data up to a negligible smoothing)."""
    workdir = Path(workdir)
    device = pick_device(config.device)
    data = sde_lib.toy_distribution(config.data.name)
    sde = sde_lib.build_sde(config)
    score_fn = models.build_score_fn(config, sde, load_toy_model(config, workdir, device))
    ev = config.eval
    x = data.sample(ev.likelihood_samples, generator=torch.Generator().manual_seed(config.seed + 12),
                    device=device)
    start = time.perf_counter()
    result = samplers.log_likelihood(score_fn, sde, x, trace=ev.trace, probes=ev.probes,
                                     eps=ev.likelihood_eps, rtol=config.sampling.rtol,
                                     atol=config.sampling.atol, progress=progress,
                                     generator=torch.Generator(device=device).manual_seed(config.seed))
    seconds = time.perf_counter() - start
    true = data.marginal_log_prob(sde, x, torch.tensor(ev.likelihood_eps, device=device)).cpu()
    logp = result.logp.double().cpu()
    n = logp.numel()
    metrics = {"sde": repr(sde), "nfe": result.nfe, "seconds": round(seconds, 3),
               "nll_nats": -logp.mean().item(), "nll_standard_error": (logp.std() / n ** 0.5).item(),
               "true_nll_nats": -true.mean().item(),
               "mean_abs_error_nats": (logp - true).abs().mean().item()}
    (workdir / "likelihood.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
