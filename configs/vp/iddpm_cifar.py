"""Improved DDPM (Nichol & Dhariwal 2021) on CIFAR-10: the cosine schedule over 4000 steps,
learned reverse variances (sigma) trained with the hybrid loss, as in the paper's CIFAR-10
runs (openai/improved-diffusion README: --image_size 32 --num_channels 128 --num_res_blocks 3
--learn_sigma True --dropout 0.3 --diffusion_steps 4000 --noise_schedule cosine --lr 1e-4
--batch_size 128; 500K training steps, EMA 0.9999, Adam without weight decay or gradient
clipping; the paper reports NLL 2.94 bits/dim and FID 2.90 for this setting).

- Schedule: alpha_bar(t) = cos^2(((t + s)/(1 + s)) pi/2) / f(0), s = 0.008, discrete betas
  clipped at 0.999 (sde_lib.CosineVPSDE, N = 4000).
- Loss: L_simple + lambda L_vlb with lambda = 0.001 (L_vlb = N times one KL term, mean over
  dimensions, in bits, with a stop-gradient on the mean: improved-diffusion's RESCALED_MSE
  with vb * N / 1000); uniform levels (their default schedule sampler).
- Network: our DDPM U-Net at their width (128, ch_mult 1-2-2-2, 3 blocks per resolution,
  attention at 16 and 8, dropout 0.3) with a 6-channel output [eps, v]. Not their U-Net:
  it has no scale-shift norm and one attention head (they use 4), so the parameter count
  and the numbers will differ somewhat.
- Sampling: 50 respaced steps (iDDPM Sec. 4) with the learned variance; the VLB of
  --mode likelihood uses the learned variance too (config.eval.vlb_variance auto).
"""
from configs.default_cifar10 import get_default_configs


def get_config():
    config = get_default_configs()
    config.sde.name = "cosine_vpsde"
    config.sde.num_scales = 4000
    config.sde.s = 0.008
    config.sde.max_beta = 0.999
    config.data.centered = True
    config.data.random_flip = True
    training = config.training
    training.continuous = False           # discrete levels 0..3999, as the paper
    training.reduce_mean = True           # mean over dimensions (improved-diffusion mean_flat)
    training.loss = "hybrid"
    training.vlb_weight = 0.001
    training.level_importance = False     # their 'uniform' schedule sampler for the hybrid loss
    training.batch_size = 128
    training.n_iters = 500_001
    optim = config.optim
    optim.lr = 1e-4
    optim.warmup = 0
    optim.grad_clip = float("inf")        # improved-diffusion does not clip gradients
    optim.weight_decay = 0.0
    model = config.model
    model.name = "ddpm"
    model.learn_sigma = True
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 3
    model.attn_resolutions = (16, 8)
    model.dropout = 0.3
    model.resamp_with_conv = True
    model.conditional = True
    config.sampling.method = "respaced"
    config.sampling.respaced.update(num_steps=50, variance="learned", spacing="uniform")
    config.eval.vlb_levels = 0            # all 4000 terms
    return config
