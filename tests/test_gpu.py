"""device=cuda end to end. Marked `gpu`; skipped where CUDA is absent (`pytest -m gpu` on a GPU)."""
from __future__ import annotations

import pyro
import pytest
import torch

from conftest import process_starts
from train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_training_keeps_everything_on_the_gpu_and_resumes(fast_config, tmp_path):
    torch.backends.cudnn.deterministic = True  # so that the two runs can be compared exactly
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(fast_config("device=cuda", "trainer.epochs=2"), straight)
    straight_params = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    assert all(value.is_cuda for value in straight_params.values())

    pyro.clear_param_store()
    train(fast_config("device=cuda", "trainer.epochs=1"), split)
    pyro.clear_param_store()
    result = train(fast_config("device=cuda", "trainer.epochs=2", f"resume={split}"), tmp_path / "ignored")
    for name, value in pyro.get_param_store().items():
        torch.testing.assert_close(value, straight_params[name], msg=name)
    assert process_starts(split) == [(1, 0), (2, 0)]  # resumed after epoch 1, not trained afresh
    assert result["test_elbo"] < 0


def test_cuda_bf16_trains_with_float32_parameters(fast_config, tmp_path):
    result = train(fast_config("device=cuda", "trainer.bf16=true", "trainer.epochs=1"), tmp_path)
    assert all(value.is_cuda and value.dtype == torch.float32 for value in pyro.get_param_store().values())
    assert -1e4 < result["test_elbo"] < 0
