"""NCSN++ (continuous VE SDE) on FFHQ at 1024 x 1024: the stand-alone Score SDE config
configs/ve/ffhq_ncsnpp_continuous.py (its 1024-px CelebA-HQ config has the same values but
reduce_mean=False).

SDE: VE, sigma_min 0.01, sigma_max 1348, num_scales 2000, continuous training with the loss
averaged over pixels (reduce_mean=True, as there); network: NCSN++ with nf 16, ch_mult (1,
2, 4, 8, 16, 32, 32, 32) (1024 -> 8 px, 512 channels at the bottom), num_res_blocks 1,
attention at 16, BigGAN blocks with skip rescaling, FIR (1, 3, 3, 1), output_skip /
input_skip (sum) progressive growing, Fourier embedding (scale 16), output divided by sigma,
no dropout, EMA 0.9999; batch 8, 2.4M steps, Adam lr 2e-4, warm-up 5000, clipping 1; data in
[0, 1], random flips; PC sampling: reverse diffusion + Langevin, snr 0.15, one corrector
step. 105,785,896 parameters (the official model's count, 16 of them the fixed Fourier
features).
"""
from configs.highres import ncsnpp_continuous


def get_config():
    config = ncsnpp_continuous("ffhq", image_size=1024, sigma_max=1348.0, nf=16,
                               ch_mult=(1, 2, 4, 8, 16, 32, 32, 32), num_res_blocks=1,
                               ema_rate=0.9999)
    config.data.data_dir = "data/ffhq1024"
    config.training.reduce_mean = True
    config.training.batch_size = 8
    config.sampling.pc.snr = 0.15
    return config
