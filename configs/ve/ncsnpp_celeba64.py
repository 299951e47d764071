"""NCSN++ on CelebA 64 x 64 with the discrete VE SDE (SMLD): the Score SDE config
configs/ve/celeba_ncsnpp.py on its default_celeba_configs.py (configs/default_celeba.py
here).

SDE: VE, sigma_min 0.01, sigma_max 90, num_scales 1000, discrete training (continuous=False,
the NCSN loss weighting); network: NCSN++ as for CIFAR-10 (nf 128, ch_mult (1, 2, 2, 2),
num_res_blocks 4, attention at 16, BigGAN blocks with skip rescaling, FIR, residual
progressive input, no progressive output) but with the positional embedding of the level
label, output divided by sigma; dropout 0.1, EMA 0.999; batch 128, 1.3M steps, Adam lr 2e-4,
warm-up 5000, clipping 1; data in [0, 1], random flips, centre crop 140 then 64 px; PC
sampling: reverse diffusion + Langevin, snr 0.17, one corrector step. 62,693,251 parameters
(the official model's count).
"""
from configs.default_cifar10 import ncsnpp_model
from configs.default_celeba import get_default_configs


def get_config():
    config = get_default_configs()
    config.sde.name = "vesde"
    config.training.continuous = False
    config.sampling.method = "pc"
    config.sampling.pc.predictor = "reverse_diffusion"
    config.sampling.pc.corrector = "langevin"
    ncsnpp_model(config.model, num_res_blocks=4, fir=True, progressive_input="residual",
                 embedding_type="positional", scale_by_sigma=True, ema_rate=0.999)
    return config
