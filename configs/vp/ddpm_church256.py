"""DDPM (Ho et al. 2020) on LSUN church_outdoor at 256 x 256 as the discrete VP SDE: the Score
SDE config configs/vp/ddpm/church.py on its default_lsun_configs.py (configs/default_lsun.py
here).

SDE: VP, 1000 steps, beta 1e-4 -> 0.02 (beta_min 0.1, beta_max 20 in the SDE's units),
discrete training with the noise-prediction loss (reduce_mean); network: the DDPM U-Net with
nf 128, ch_mult (1, 1, 2, 2, 4, 4) (256 -> 8 px), num_res_blocks 2, attention at 16, no
dropout, EMA 0.9999; batch 64, 2.4M steps, Adam lr 2e-5, warm-up 5000, clipping 1; data in
[-1, 1] (centered), random flips; ancestral sampling (DDPM Alg. 2), no corrector.
111,569,923 parameters (the official PyTorch model's count; the DDPM paper: 114M).
"""
from configs.default_lsun import get_default_configs


def get_config():
    config = get_default_configs("church")
    config.sde.name = "vpsde"
    config.sde.num_scales = 1000
    config.data.centered = True
    config.training.continuous = False
    config.training.reduce_mean = True
    config.optim.lr = 2e-5
    config.sampling.method = "pc"
    config.sampling.pc.predictor = "ancestral_sampling"
    config.sampling.pc.corrector = "none"
    model = config.model
    model.name = "ddpm"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.dropout = 0.0
    model.nf = 128
    model.ch_mult = (1, 1, 2, 2, 4, 4)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    return config
