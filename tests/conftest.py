"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # The test models are tiny: intra-op parallelism only adds contention on a 2-core machine
    # (and oversubscribes it when 2-process DDP tests run). Tests that need more set it themselves.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
