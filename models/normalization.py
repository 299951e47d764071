"""InstanceNorm++ of NCSN (Song & Ermon 2019, "Generative Modeling by Estimating Gradients of
the Data Distribution", App. A): unconditional (NCSNv2) and conditioned on an integer label
(NCSN: the noise level).

Plain instance normalisation removes each channel's spatial mean, and with it the colour
shift of an image. InstanceNorm++ puts that information back:

    mu_k = mean over (h, w) of x_k,  m, s = mean and standard deviation of mu over channels
    z_k  = gamma_k [(x_k - mu_k) / sigma_k + alpha_k (mu_k - m) / s] + beta_k

with sigma_k the spatial standard deviation (biased, eps 1e-5 as ``nn.InstanceNorm2d``) and
s the unbiased standard deviation over channels (eps 1e-5), as in the Score SDE PyTorch code.

Parameter names follow that code: ``InstanceNorm2dPlus`` holds ``alpha``, ``gamma``, ``beta``
(C,); ``ConditionalInstanceNorm2dPlus`` holds one ``embed`` (num_classes, 3 C) whose rows are
[gamma | alpha | beta]. Both modules take ``(x, y)``; the unconditional one ignores ``y``, so
the RefineNet blocks call every norm the same way.

Statistics are computed in float32 when x is in a lower precision (bf16 / fp16 autocast); the
result is returned in x's dtype.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["InstanceNorm2dPlus", "ConditionalInstanceNorm2dPlus", "instance_norm_plus"]

_EPS = 1e-5


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    """(C,) or (B, C) -> broadcastable over (B, C, H, W)."""
    return v.unsqueeze(-1).unsqueeze(-1)


def instance_norm_plus(x: torch.Tensor, gamma: torch.Tensor, alpha: torch.Tensor,
                       beta: torch.Tensor | None) -> torch.Tensor:
    """InstanceNorm++ of x (B, C, H, W); gamma, alpha, beta of shape (C,) or (B, C); no beta
    means no shift. Returns (B, C, H, W) in x's dtype."""
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    means = x.mean(dim=(2, 3))                                   # mu_k, (B, C)
    m = means.mean(dim=1, keepdim=True)
    v = means.var(dim=1, keepdim=True)                           # unbiased, over channels
    means = (means - m) / torch.sqrt(v + _EPS)
    h = F.instance_norm(x, eps=_EPS)                             # (x_k - mu_k) / sigma_k
    h = h + _per_channel(means * alpha.to(x.dtype))
    out = _per_channel(gamma.to(x.dtype)) * h
    if beta is not None:
        out = out + _per_channel(beta.to(x.dtype))
    return out.to(dtype)


class InstanceNorm2dPlus(nn.Module):
    """Unconditional InstanceNorm++ (NCSNv2). alpha, gamma ~ N(1, 0.02), beta = 0 at init."""

    def __init__(self, num_features: int, bias: bool = True):
        super().__init__()
        self.num_features = num_features
        self.alpha = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        self.gamma = nn.Parameter(torch.empty(num_features).normal_(1.0, 0.02))
        self.beta = nn.Parameter(torch.zeros(num_features)) if bias else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W); y is ignored (unconditional)."""
        return instance_norm_plus(x, self.gamma, self.alpha, self.beta)


class ConditionalInstanceNorm2dPlus(nn.Module):
    """InstanceNorm++ whose gamma, alpha, beta are rows of an embedding indexed by a label
    (NCSN: the noise level). gamma, alpha ~ N(1, 0.02), beta = 0 at init."""

    def __init__(self, num_features: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.num_features, self.bias = num_features, bias
        self.embed = nn.Embedding(num_classes, (3 if bias else 2) * num_features)
        with torch.no_grad():
            self.embed.weight[:, :2 * num_features].normal_(1.0, 0.02)
            self.embed.weight[:, 2 * num_features:].zero_()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); y: (B,) long labels in [0, num_classes)."""
        params = self.embed(y).chunk(3 if self.bias else 2, dim=-1)
        gamma, alpha = params[0], params[1]
        return instance_norm_plus(x, gamma, alpha, params[2] if self.bias else None)
