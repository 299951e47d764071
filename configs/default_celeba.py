"""Shared default for CelebA at 64 x 64 (162,770 aligned training faces of 178 x 218 px), with
the hyperparameters of the official Score SDE code (configs/default_celeba_configs.py):
batch 128, 1.3M steps, Adam lr 2e-4 with 5000 warm-up steps, gradient clipping at 1,
dropout 0.1, seed 42, data in [0, 1] with random flips; VE sigma 0.01 -> 90 (sigma_max 90,
the NCSNv2 paper's sigma_1 for CelebA) over 1000 levels, VP beta 0.1 -> 20; PC sampling with
one Langevin step per level (n_steps_each 1) at snr 0.17 and the final denoising step.

Data: <data_dir>/train/ and <data_dir>/test/ hold the aligned images (img_align_celeba/;
the official split: list_eval_partition.txt, 0 = train, 1 = validation used as test).
Each face is cut to its centre 140 x 140 square (config.data.center_crop; the NCSNv2 and Score
SDE pipelines both crop 140) and resized to 64 x 64 (here bicubic, theirs bilinear with
antialiasing). The 2.0 GB of decoded training images are held in memory.
"""
from configs.default_folder import folder_config


def get_default_configs():
    config = folder_config(data_dir="data/celeba", image_size=64, center_crop=140,
                           random_flip=True, centered=False, sigma_max=90.0, n_iters=1_300_001,
                           batch_size=128, dropout=0.1, snapshot_freq_for_preemption=10_000)
    config.sampling.pc.snr = 0.17
    config.sampling.pc.n_steps = 1
    config.sampling.pc.denoise = True
    return config
