"""Device and dtype choice, the hardware stamp."""

import pytest
import torch

from course_lib.env import hardware_stamp, pick_device, pick_dtype, run_sizes


def test_cpu_gets_fp32():
    assert pick_dtype(torch.device("cpu")) == torch.float32


def test_dtype_override_by_name_and_env(monkeypatch):
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    monkeypatch.setenv("COURSE_DTYPE", "float16")
    assert pick_dtype(torch.device("cpu")) == torch.float16


def test_unknown_dtype_lists_choices():
    with pytest.raises(ValueError, match="unknown dtype 'int3'.*bfloat16"):
        pick_dtype(torch.device("cpu"), "int3")


def test_device_env_override(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")


def test_unknown_device_is_a_value_error():
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        pick_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_says_so(monkeypatch):
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        pick_device("cuda")
    monkeypatch.setenv("COURSE_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="COURSE_DEVICE"):
        pick_device()


def test_run_sizes_grow_on_gpu():
    cpu, gpu = run_sizes("cpu"), run_sizes("cuda")
    assert gpu.new_tokens > cpu.new_tokens and gpu.max_batch > cpu.max_batch


def test_hardware_stamp_names_the_machine():
    stamp = hardware_stamp()
    assert stamp.cpu_cores >= 1 and stamp.cpu
    assert stamp.torch == torch.__version__
    assert stamp.transformers and stamp.transformers[0].isdigit()
    assert (stamp.gpu is None) == (not torch.cuda.is_available() and not torch.backends.mps.is_available())
    assert set(stamp.as_dict()) >= {"cpu", "gpu", "torch", "transformers", "bitsandbytes"}


def test_memory_check_scales_with_what_is_free():
    from course_lib.env import fits_in_memory, free_memory_bytes

    free = free_memory_bytes("cpu")
    assert free > 0
    assert fits_in_memory(1, "cpu") and not fits_in_memory(free * 2, "cpu")
    assert not fits_in_memory(free * 0.9, "cpu", headroom=0.5)
