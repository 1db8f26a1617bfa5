"""GPU tests: marked `cuda` (run them with `pytest -m cuda`) and skipped where no CUDA device is.

Everything here imports only torch, numpy, safetensors, pydantic, pyyaml and the package's
torch-level modules: a GPU machine may have no Ray, MLflow or DeepSpeed.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    here = str(config.rootpath / "tests" / "gpu")
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.cuda)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_gpu_memory():
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
