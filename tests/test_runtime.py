"""Device choice and process set-up."""

import pytest
import torch

from nfsd_nerf.errors import UserError
from nfsd_nerf.runtime import cpu_threads, describe_device, module_device, package_versions, resolve_device


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="not supported"):
        resolve_device("mps")
    with pytest.raises(UserError, match="expected auto, cuda, cpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            resolve_device("cuda")
    assert describe_device(torch.device("cpu")) == "cpu"


def test_module_device_and_versions():
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters
    versions = package_versions()
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"].startswith(torch.__version__[:4])
    assert "nfsd-nerf" in versions


def test_cpu_threads_holds_for_the_block_only():
    process_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with cpu_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with cpu_threads(None):
            assert torch.get_num_threads() == 2
        with pytest.raises(KeyboardInterrupt), cpu_threads(1):
            raise KeyboardInterrupt
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(process_threads)
