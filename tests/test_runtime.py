"""Process-wide settings that `runtime.setup` makes for a device."""

import torch

from bigtransfer.runtime import autotune_convolutions


def test_cudnn_autotuning_only_on_cuda_and_never_against_determinism(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    cuda = torch.device("cuda")  # only the flag is set: no GPU needed
    assert not autotune_convolutions(torch.device("cpu")) and not torch.backends.cudnn.benchmark
    monkeypatch.setenv("BIGTRANSFER_CUDNN_AUTOTUNE", "0")
    assert not autotune_convolutions(cuda) and not torch.backends.cudnn.benchmark
    monkeypatch.delenv("BIGTRANSFER_CUDNN_AUTOTUNE")
    torch.use_deterministic_algorithms(True)
    try:
        assert not autotune_convolutions(cuda) and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
    assert autotune_convolutions(cuda) and torch.backends.cudnn.benchmark
