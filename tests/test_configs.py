"""Every config file: it loads, its groups build (SDE, loss, model, score function), the
CIFAR-10 configs build the published architectures (parameter counts of the official Score
SDE models), and the digits families are small and map 8x8 images to 8x8 scores."""
import importlib.util
from pathlib import Path

import pytest
import torch

import samplers
from run_lib import compose

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").glob("*/*.py") if p.name != "__init__.py")

#: Parameter counts of the official Score SDE (PyTorch) models built with these configs.
PUBLISHED_PARAMS = {
    "ve/ncsnpp_cifar.py": 62_758_915,
    "ve/ncsnpp_deep_cifar.py": 107_587_075,
    "vp/ddpmpp_cifar.py": 61_804_419,
    "vp/ddpmpp_deep_cifar.py": 106_632_579,
    "subvp/ddpmpp_cifar.py": 61_804_419,
    "vp/ddpm_cifar.py": 35_218_947,
    "ve/ncsn_cifar.py": 30_117_635,
    "ve/ncsnv2_cifar.py": 29_694_083,
    # not a published count: our DDPM U-Net at Improved DDPM's CIFAR-10 width (128, 3 blocks,
    # attention at 16 and 8) with the 6-channel [eps, v] head; theirs has scale-shift norm
    # and 4 attention heads
    "vp/iddpm_cifar.py": 47_484_166,
}


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"config_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def test_every_cifar_config_is_checked():
    cifar = {name(p) for p in CONFIG_FILES if p.stem.endswith("_cifar")}
    assert cifar == set(PUBLISHED_PARAMS)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=name)
def test_config_builds_sde_and_loss(path):
    config = load(path)
    sde = compose.build_sde(config)
    compose.build_loss_fn(config, sde)
    assert config.model.name in compose.MODEL_ARGUMENTS
    config.to_json_best_effort()           # written to the work directory at start


@pytest.mark.parametrize("path", CONFIG_FILES, ids=name)
def test_config_sampling_groups_are_the_registry_and_valid(path):
    """config.sampling has one group per registered sampler with exactly its options, and
    the default sampler's options are valid for the config's SDE."""
    config = load(path)
    sde = compose.build_sde(config)
    for sampler_name, sampler in samplers.SAMPLERS.items():
        assert set(config.sampling[sampler_name]) == set(sampler.defaults), sampler_name
    name_, options = compose.sampler_options(config)
    samplers.SAMPLERS[name_].options(sde, options)


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if p.stem.endswith("_cifar")], ids=name)
def test_cifar_configs_build_the_published_models(path):
    config = load(path)
    with torch.device("meta"):             # counts without allocating 100M parameters
        model = compose.build_model(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name(path)]
    assert (config.data.name, config.data.image_size, config.data.num_channels) == ("cifar10", 32, 3)


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if p.stem.endswith("_digits")], ids=name)
def test_digits_configs_are_small_and_give_scores_of_the_image_shape(path):
    config = load(path)
    torch.manual_seed(0)
    model = compose.build_model(config)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    sde = compose.build_sde(config)
    score_fn = compose.build_score_fn(config, sde, model.eval())
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.01, 0.5, 1.0])
    with torch.no_grad():
        score = score_fn(x, t)
    assert score.shape == x.shape and torch.isfinite(score).all()
