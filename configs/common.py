"""Config groups shared by every data set's default; each default overrides what differs."""
import ml_collections

import samplers


def sde_group(*, sigma_max: float) -> ml_collections.ConfigDict:
    """VP by default; beta_* for VP / sub-VP, sigma_* for VE (sigma_max ~ the largest distance
    between two data points, Song & Ermon 2020, technique 1), s / max_beta for cosine_vpsde
    (improved DDPM's values), logsnr_* for logsnr_vpsde (sde_lib.LinearLogSNRVPSDE)."""
    return ml_collections.ConfigDict(dict(
        name="vpsde", beta_min=0.1, beta_max=20.0, sigma_min=0.01, sigma_max=sigma_max,
        s=0.008, max_beta=0.999, logsnr_min=-10.0, logsnr_max=13.3, num_scales=1000))


def training_group(*, n_iters: int, batch_size: int, log_freq: int) -> ml_collections.ConfigDict:
    """The DSM objective's options (sde_lib.build_loss_fn) and the loop's length and logging."""
    return ml_collections.ConfigDict(dict(
        n_iters=n_iters, batch_size=batch_size, continuous=True, reduce_mean=False,
        likelihood_weighting=False, importance_sampling=False, eps=1e-5, log_freq=log_freq,
        # run_lib.train: 'no' | 'bf16' (autocast of the network forward; fp32 weights and loss)
        mixed_precision="no",
        # the objective: 'simple' (DSM), or for a network with a variance head
        # (model.learn_sigma) Improved DDPM's 'hybrid' L_simple + vlb_weight L_vlb or 'vlb';
        # level_importance: loss-aware sampling of the levels of L_vlb (sde_lib.LossAwareLevels)
        loss="simple", vlb_weight=0.001, level_importance=False,
        # gradient accumulation: each process's share batch_size / W of the global batch runs
        # in equal micro-batches of at most batch_per_device rows, one optimizer step per
        # global batch (same result up to float rounding); 0: the whole share at once
        batch_per_device=0,
        # sample grids with the EMA weights every sample_freq steps (0: off), fast sampler
        sample_freq=10000, num_grid_samples=64, grid_sampler="dpm_solver",
        # test loss of the EMA weights every eval_freq steps (0: off) on eval_batches batches
        eval_freq=5000, eval_batches=8,
        # classifier-free guidance training (Ho & Salimans 2022): with probability p_uncond a
        # label is replaced by the null label model.num_classes (the network then has
        # num_classes + 1 label rows; run_lib.compose.null_label); 0: plain conditional
        p_uncond=0.0))


def optim_group(*, warmup: int) -> ml_collections.ConfigDict:
    """Adam with linear warm-up over ``warmup`` steps and gradient-norm clipping."""
    return ml_collections.ConfigDict(dict(
        lr=2e-3, beta1=0.9, eps=1e-8, weight_decay=0.0, warmup=warmup, grad_clip=1.0))


def eval_group(*, likelihood_samples: int, batch_size: int, trace: str,
               num_samples: int = 50_000, sample_batch: int = 500) -> ml_collections.ConfigDict:
    """The ODE likelihood's options (run_lib.evaluate.likelihood, samplers.likelihood):
    ``likelihood_samples`` test points (0: the whole split), ``batch_size`` points per ODE solve
    (0: all at once), the divergence ``trace`` ('hutchinson' with ``probes`` Rademacher /
    Gaussian probes, as the Score SDE code, or 'exact'), the start time ``likelihood_eps`` (Score
    SDE: 1e-5), the solver and its tolerances; ``num_steps`` is for fixed-grid methods (None:
    the solver's default).

    Sample quality (--mode eval / ref_stats, run_lib.quality): ``num_samples`` samples (the
    papers: 50k) drawn in seeded chunks of ``sample_batch`` with the EMA weights (use_ema),
    features of ``features`` ('auto': digits classifier for the digits, else 'inception', the
    TF Inception-v3 file ``inception_path``) in batches of feature_batch, against
    ``ref_stats`` (empty: <data_dir>/ref_stats/<data>-<ref_split>-...npz) that keep the first
    ref_features features; KID over kid_subsets subsets of kid_subset_size, IS over
    is_splits splits, precision / recall with pr_k neighbours on the first pr_samples."""
    return ml_collections.ConfigDict(dict(
        likelihood_samples=likelihood_samples, batch_size=batch_size, likelihood_eps=1e-5,
        trace=trace, probes=1, ode_method="dopri5", rtol=1e-5, atol=1e-5,
        num_steps=ml_collections.config_dict.placeholder(int),
        # the variational bound next to the ODE (SDEs with a discrete chain; samplers.vlb):
        # reverse variance auto (learned with model.learn_sigma, else small) | small | large |
        # analytic (estimated on vlb_analytic_samples training images) | learned, vlb_levels
        # KL terms (0: all N - 1; else an unbiased subset)
        vlb=True, vlb_variance="auto", vlb_levels=0, vlb_analytic_samples=100,
        num_samples=num_samples, sample_batch=sample_batch, use_ema=True, features="auto",
        inception_path="", ref_stats="", ref_split="train", ref_features=50_000,
        feature_batch=250, kid_subsets=100, kid_subset_size=1000, is_splits=10, pr_k=3,
        pr_samples=10_000))


def sampling_group(*, num_samples: int) -> ml_collections.ConfigDict:
    """The samplers' options, one group per entry of the registry samplers.SAMPLERS with its
    defaults (``config.sampling.pc.snr``, ``config.sampling.dpm_solver.order``, ...), the
    default sampler ``method`` (main.py --sampler overrides it) and how many samples to draw.
    An option whose default is None (ode.num_steps) is a typed placeholder."""
    sampling = ml_collections.ConfigDict()
    sampling.method = "pc"
    sampling.num_samples = num_samples
    # class-conditional and guided sampling (run_lib.compose.guided_score_fn), every sampler:
    # class_label: the class of every sample, -1 = balanced over the classes (0, 1, ..., K-1,
    # 0, ...); guidance: 'none' | 'cfg' | 'classifier' | 'auto' (auto: classifier guidance when
    # main.py --classifier is given, else CFG for a model trained with training.p_uncond > 0,
    # else none). CFG (Ho & Salimans 2022): (1 + w) s(x, t, y) - w s(x, t, null), w =
    # guidance_scale; classifier guidance: s(x, t[, y]) + w grad_x log p_phi(y | x_t, t) with
    # the train_classifier checkpoint of --classifier (default with guidance='classifier':
    # <workdir>/classifier/checkpoints/latest.pt). guidance_scale >= 0 (0: unguided).
    # thresholding: Imagen's dynamic thresholding (Saharia et al. 2022) of the data prediction
    # at the quantile thresholding_percentile, for data in [-1, 1] (data.centered=True).
    sampling.class_label = -1
    sampling.guidance = "auto"
    sampling.guidance_scale = 0.0
    sampling.thresholding = False
    sampling.thresholding_percentile = 0.995
    for name, sampler in samplers.SAMPLERS.items():
        group = ml_collections.ConfigDict()
        for key, value in sampler.defaults.items():
            group[key] = (ml_collections.config_dict.placeholder(sampler.option_type(key))
                          if value is None else value)
        sampling[name] = group
    return sampling


def classifier_group(*, name: str, num_classes: int, n_iters: int, batch_size: int, lr: float,
                     eval_sigmas, **network) -> ml_collections.ConfigDict:
    """The noise-conditional classifier p(y | x_t, t) of classifier guidance and its training
    (python main.py --mode train_classifier; run_lib.classifier), on the config's SDE and data:
    the network ``name`` (models.CLASSIFIERS) with its keyword arguments ``network``
    (run_lib.compose.CLASSIFIER_KEYS), Adam at ``lr`` with warm-up, gradient clipping and an
    EMA, checkpoints under <workdir>/classifier/, and the test accuracy of the EMA weights at
    the noise levels ``eval_sigmas`` (sigma = std / alpha) every eval_freq steps."""
    return ml_collections.ConfigDict(dict(
        name=name, num_classes=num_classes, **network,
        n_iters=n_iters, batch_size=batch_size, lr=lr, warmup=100, weight_decay=0.0,
        grad_clip=1.0, ema_rate=0.999, eps=1e-5, log_freq=100,
        snapshot_freq=max(n_iters // 2, 1), snapshot_freq_for_preemption=max(n_iters // 4, 1),
        eval_freq=max(n_iters // 4, 1), eval_batches=4, eval_sigmas=tuple(eval_sigmas)))


def inpaint_group(*, num_images: int = 16) -> ml_collections.ConfigDict:
    """The inverse problem of --mode inpaint (run_lib.inverse): ``task`` 'inpaint' (fill the
    region ``mask``: 'left_half', 'bottom_half', 'center', 'random' with ``random_fraction`` of
    the pixels known, or the path of a PNG, white = known), 'colorize' (RGB data) or
    'super_resolution' (``factor`` x ``factor`` block means observed); ``method`` 'replace' |
    'smc' | 'pigdm' (samplers.INVERSE_METHODS) with the registry ``sampler`` and its options
    config.sampling.<sampler> ('smc' runs its own filter with ``particles`` and
    ``ess_threshold`` on the pc grid); ``noise_std`` of the observation ('pigdm' only) and its
    ``guidance_scale``; ``known_noise`` of 'replace' ('fresh' | 'fixed'); ``images`` 'test' (the
    first ``num_images`` of the test split) or an .npz / .png file; ``batch_size`` images per
    sampler call (0: all at once)."""
    return ml_collections.ConfigDict(dict(
        task="inpaint", mask="bottom_half", random_fraction=0.5, factor=2, method="replace",
        sampler="pc", images="test", num_images=num_images, batch_size=0, noise_std=0.0,
        guidance_scale=1.0, particles=16, ess_threshold=0.5, known_noise="fresh"))
