"""`steer` on MiniLM: the hooked module's output moves by exactly scale x direction and the model's
output changes; both for a latent's decoder row and for a PCA component."""

import numpy as np
import pytest
import torch

from dictsweep.analysis import steer
from dictsweep.errors import InputError
from dictsweep.sae.baselines import fit_pca
from dictsweep.store.dataset import ActivationDataset
from dictsweep.store.models import capture_outputs
from tests.analysis.conftest import data_dictionary

HOOK = "encoder.layer.3"


@pytest.fixture(scope="module")
def model(minilm_harvest):
    from transformers import AutoModel

    _, model_path = minilm_harvest
    return AutoModel.from_pretrained(model_path, local_files_only=True).eval()


def run(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the hook's output [1, T, d_model], the last hidden state [1, T, d_model])."""
    with capture_outputs(model, [HOOK], stop_early=False) as capture:
        with torch.inference_mode():
            last = model(input_ids=input_ids).last_hidden_state
        return capture.outputs[HOOK], last


def directions(minilm_harvest, tmp_path) -> dict[str, torch.Tensor]:
    from dictsweep import load_dictionary

    uri, _ = minilm_harvest
    sae = load_dictionary(str(data_dictionary(tmp_path / "sae", uri, 8)))
    data = ActivationDataset.open(uri)
    pca = fit_pca(data.read_shard(index).float() for index in range(len(data.shards())))
    return {"latent": sae.W_dec[3].detach(), "pca": pca.components[0].float()}


def test_the_hook_output_moves_by_exactly_scale_times_direction(model, minilm_harvest, tmp_path):
    input_ids = torch.tensor([[101, 1996, 4874, 2003, 2513, 2011, 1996, 3853, 1012, 102]])  # [1, 10]
    hooked, last = run(model, input_ids)
    for name, direction in directions(minilm_harvest, tmp_path).items():
        scale = 4.0
        with steer(model, HOOK, direction, scale):
            steered, steered_last = run(model, input_ids)
        assert torch.equal(steered, hooked + scale * direction), name  # every position, bit for bit
        assert (steered_last - last).abs().max() > 0.1, name  # the layers after the hook see it
        again, again_last = run(model, input_ids)  # leaving the block removes the hook
        assert torch.equal(again, hooked) and torch.equal(again_last, last)


def test_a_direction_of_the_wrong_width_is_refused(model):
    input_ids = torch.tensor([[101, 1996, 102]])
    with pytest.raises(InputError, match="16 dimensions but encoder.layer.3 outputs 384"):
        with steer(model, HOOK, torch.ones(16), 1.0):
            run(model, input_ids)
    with pytest.raises(InputError, match="no such module"):
        with steer(model, "encoder.layer.9", torch.ones(384), 1.0):
            pass
    assert np.isfinite(run(model, input_ids)[1].numpy()).all()
