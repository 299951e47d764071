"""NCSN++ (continuous VE SDE) on LSUN church_outdoor at 256 x 256: the Score SDE config
configs/ve/church_ncsnpp_continuous.py on its default_lsun_configs.py
(configs/default_lsun.py here).

SDE: VE, sigma_min 0.01, sigma_max 380, num_scales 2000, continuous training; network:
NCSN++ with nf 128, ch_mult (1, 1, 2, 2, 2, 2, 2) (256 -> 4 px), num_res_blocks 2, attention
at 16, BigGAN blocks with skip rescaling, FIR (1, 3, 3, 1), output_skip / input_skip (sum)
progressive growing, Fourier embedding (scale 16), output divided by sigma, no dropout, EMA
0.999; batch 64, 2.4M steps, Adam lr 2e-4, warm-up 5000, clipping 1; data in [0, 1], random
flips; PC sampling: reverse diffusion + Langevin, snr 0.075, one corrector step. 65,574,549
parameters (the official model's count, 128 of them the fixed Fourier features).
"""
from configs.highres import ncsnpp_256


def get_config():
    return ncsnpp_256("church", sigma_max=380.0)
