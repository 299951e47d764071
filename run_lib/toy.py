"""Training on built-in toy distributions with a closed-form score (2-D mixture, Gaussian).

Because the exact score of every perturbed marginal is known, the run reports how far the
learned score is from it, not only the loss.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

import models
import sde_lib

from .utils import pick_device, save_atomic, write_config

__all__ = ["relative_score_error", "train_toy"]

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
