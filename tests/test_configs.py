"""Every adapter preset in configs/adapter instantiates through Hydra and builds on a backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moka_train.adapters import AdapterConfig, available_methods, count_parameters, inject_adapters
from tests.helpers import tiny_llama

PRESETS = sorted((Path(__file__).parents[1] / "configs" / "adapter").glob("*.yaml"))


def test_every_method_has_a_preset():
    assert {p.stem for p in PRESETS} >= set(available_methods())


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_instantiates(path):
    config = instantiate(OmegaConf.load(path))
    assert isinstance(config, AdapterConfig)
    assert config.method == path.stem or path.stem.startswith(config.method)
    assert (config.rank, config.alpha, config.dropout) == (4, 16.0, 0.05)
    model = inject_adapters(tiny_llama(), config)
    assert count_parameters(model).adapter > 0
    assert AdapterConfig.from_dict(config.to_dict()) == config
