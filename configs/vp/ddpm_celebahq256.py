"""DDPM (Ho et al. 2020) on CelebA-HQ at 256 x 256 as the discrete VP SDE: the Score SDE config
configs/vp/ddpm/celebahq.py on its default_lsun_configs.py (configs/default_lsun.py here).

SDE: VP, 1000 steps, beta 1e-4 -> 0.02 (beta_min 0.1, beta_max 20 in the SDE's units),
discrete training with the noise-prediction loss (reduce_mean); network: the DDPM U-Net with
nf 128, ch_mult (1, 1, 2, 2, 4, 4) (256 -> 8 px), num_res_blocks 2, attention at 16, no
dropout, EMA 0.9999; batch 64, 2.4M steps, Adam lr 2e-5, warm-up 5000, clipping 1; data in
[-1, 1] (centered), random flips; ancestral sampling (DDPM Alg. 2), no corrector.
111,569,923 parameters (the official PyTorch model's count; the DDPM paper: 114M).
"""
from configs.highres import ddpm_256


def get_config():
    return ddpm_256("celebahq")
