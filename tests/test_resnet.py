"""Residual blocks (`model=resnet`, vae/resnet.py): new blocks are the identity, so a deeper network
given a shallower one's weights computes the same outputs; the blocks learn and load back; a count of
blocks that is no count is refused. (Old residual runs resume exactly: tests/test_old_checkpoints.py.)"""
from __future__ import annotations

import pytest
import torch

from conftest import FAST, compose_config
from guide import Encoder
from model import Bernoulli, Decoder
from test_levers import read_metrics, run
from vae.config import ConfigError, check_config
from vae.likelihoods import DiscretizedLogistic
from vae.resnet import ResidualDecoder, ResidualEncoder
from vae.runs import load_run


def copy_plain_weights(shallow: torch.nn.Module, deep: torch.nn.Module) -> None:
    """Give `deep` the weights of `shallow`: the same layers in the same order, plus the blocks."""
    plain = [p for name, p in deep.named_parameters() if ".residual." not in name]
    assert len(plain) == len(list(shallow.parameters())) < len(list(deep.parameters()))
    with torch.no_grad():
        for target, source in zip(plain, shallow.parameters()):
            target.copy_(source)


LIKELIHOODS = {"bernoulli": Bernoulli, "discretized_logistic": DiscretizedLogistic}


def parameters(p_x) -> list[torch.Tensor]:
    """The per-pixel parameters of p(x|t) (each of its distribution's arguments)."""
    return [getattr(p_x.base_dist, name) for name in p_x.base_dist.arg_constraints]


@pytest.mark.parametrize("likelihood", list(LIKELIHOODS))
def test_new_residual_blocks_are_the_identity(likelihood):
    image_shape, sizes = (1, 16, 16), dict(latent_dim=3, channels=[4, 8], hidden_dim=16)
    torch.manual_seed(0)
    shallow_encoder, deep_encoder = Encoder(image_shape, **sizes), ResidualEncoder(image_shape, **sizes, residual_blocks=2)
    shallow_decoder = Decoder(image_shape, **sizes, likelihood=LIKELIHOODS[likelihood]())
    deep_decoder = ResidualDecoder(image_shape, **sizes, likelihood=LIKELIHOODS[likelihood](), residual_blocks=2)
    copy_plain_weights(shallow_encoder, deep_encoder)
    copy_plain_weights(shallow_decoder, deep_decoder)
    x, t = torch.rand(5, *image_shape), torch.randn(5, 3)
    for shallow_out, deep_out in zip(shallow_encoder(x), deep_encoder(x)):
        assert torch.equal(shallow_out, deep_out)
    shallow_out, deep_out = parameters(shallow_decoder(t)), parameters(deep_decoder(t))
    assert len(shallow_out) == len(deep_out) >= 1
    for a, b in zip(shallow_out, deep_out, strict=True):
        assert torch.equal(a, b)
    moved = deep_encoder.features[2].residual[-1].weight  # a block that is trained is no longer the identity
    with torch.no_grad():
        moved.add_(0.1)
    assert not torch.equal(deep_encoder(x)[0], shallow_encoder(x)[0])


def test_a_residual_run_trains_its_blocks_and_loads_back(tmp_path):
    trained = run(tmp_path, "model=resnet")
    elbos = [m["test_elbo"] for m in read_metrics(tmp_path)]
    assert elbos[-1] > elbos[0] + 30, elbos
    last_convs = [name for name in trained if name.endswith("residual.3.weight")]
    assert len(last_convs) == 4  # two resolutions in the encoder, two in the decoder
    assert all(trained[name].abs().max() > 0 for name in last_convs)  # they left the identity
    loaded = load_run(tmp_path, "cpu")
    weights = {f"encoder$$${n}": p for n, p in loaded.encoder.named_parameters()}
    weights.update({f"decoder$$${n}": p for n, p in loaded.decoder.named_parameters()})
    assert set(weights) == set(trained) and all(torch.equal(weights[n], trained[n]) for n in trained)


def test_a_network_without_blocks_is_refused():
    with pytest.raises(ValueError, match="model.residual_blocks=0: must be a positive number"):
        ResidualEncoder((1, 16, 16), latent_dim=3, channels=[4, 8], hidden_dim=16, residual_blocks=0)


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "true"])
def test_a_count_of_blocks_that_is_no_count_is_refused(value):
    with pytest.raises(ConfigError, match=f"(?i)model.residual_blocks={value}: must be a positive number"):
        check_config(compose_config(*FAST, "model=resnet", f"model.residual_blocks={value}"))
