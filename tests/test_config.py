"""Every option under conf/ composes, passes the config checks, and instantiates."""
from __future__ import annotations

import inspect

import pytest
from hydra.utils import get_class, instantiate

from conftest import CONF_DIR, compose_config
from train import check_config

OPTIONS = sorted(
    (path.parent.name, path.stem) for path in CONF_DIR.glob("*/*.yaml") if path.parent.name != "task"
)  # (group, option) for every training file: a new file is tested without editing this test
# (conf/task/ belongs to evaluate.yaml, not config.yaml: tests/test_evaluate.py composes those)


def test_every_group_has_options():
    groups = {group for group, _ in OPTIONS}
    assert groups == {"data", "model", "estimator", "optim", "trainer"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option, tmp_path):
    cfg = compose_config(f"{group}={option}")
    check_config(cfg)

    # The dataset's target exists and accepts the config's keys plus root and train.
    dataset_cls = get_class(cfg.data.dataset._target_)
    kwargs = {k: v for k, v in cfg.data.dataset.items() if k != "_target_"}
    inspect.signature(dataset_cls).bind(root=str(tmp_path), train=True, **kwargs)
    if dataset_cls.__module__ == "data":  # file-free datasets are built for real
        dataset = instantiate(cfg.data.dataset, root=str(tmp_path), train=False)
        assert len(dataset.data) == len(dataset.targets) > 0

    encoder = instantiate(cfg.model.encoder, image_shape=(1, 28, 28))
    decoder = instantiate(cfg.model.decoder, image_shape=(1, 28, 28))
    assert encoder.t_loc.out_features == decoder.latent_dim == cfg.model.latent_dim
    optimizer = instantiate(cfg.optim)
    assert optimizer.pt_optim_constructor.__name__ == cfg.optim._target_.rsplit(".", 1)[-1]
    elbo = instantiate(cfg.estimator.elbo)
    assert elbo.num_particles == cfg.estimator.elbo.num_particles
    assert isinstance(cfg.estimator.reparameterized, bool)
    assert cfg.trainer.epochs >= 1


def test_variants_hold_only_their_difference():
    """Each variant that inherits a sibling overrides only what differs."""
    assert compose_config("estimator=score").estimator.elbo == compose_config("estimator=reparam").estimator.elbo
    assert compose_config("estimator=score").estimator.reparameterized is False
    clipped = compose_config("optim=clipped_adam").optim
    assert clipped.optim_args.lr == compose_config("optim=adam").optim.optim_args.lr
    assert "clip_norm" in clipped.optim_args


def test_data_root_defaults_to_environment(monkeypatch):
    monkeypatch.setenv("VAE_DATA_ROOT", "/somewhere/data")
    assert compose_config().data.root == "/somewhere/data"
    monkeypatch.delenv("VAE_DATA_ROOT")
    assert compose_config().data.root == "data"
