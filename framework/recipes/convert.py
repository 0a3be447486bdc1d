"""`sapling convert input=<file.gguf> output=<dir> [dtype=float32]`: a llama.cpp GGUF model as a normal HF
checkpoint (safetensors, tokenizer, chat template), for tools that do not read GGUF. No Hydra: three keys.

The commands read `.gguf` sources directly (converted once into `cache_dir/gguf`); this writes the same
checkpoint where the user wants it, in the dtype they choose."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sapling.errors import ConfigError
from sapling.io import check_output, write_run
from sapling.models.gguf import PACKAGE_SCHEME, convert_gguf, gguf_problem, package_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
USAGE = "pass input=<file.gguf> output=<dir> [dtype=float32|bfloat16|float16]"


def run_convert(args: list[str]) -> Path:
    """The `key=value` arguments of `sapling convert` checked (before anything loads), then the conversion."""
    keys = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("input", "output", "dtype"):
            raise ConfigError(key, value or None, "convert takes no such argument", USAGE)
        keys[key] = value
    for key in ("input", "output"):
        if not keys.get(key):
            raise ConfigError(key, None, f"convert needs {key}", USAGE)
    dtype = keys.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError("dtype", dtype, "unknown dtype", "use float32 (the dequantized values exactly), bfloat16 "
                          "or float16")
    source = keys["input"]
    if source.startswith(PACKAGE_SCHEME):
        source = package_file(source, "input")
    path = Path(os.path.expanduser(source))
    if not path.is_file():
        raise ConfigError("input", keys["input"], "no such file", "pass the path of a .gguf model file")
    problem = gguf_problem(path)
    if problem is not None:
        raise ConfigError("input", keys["input"], *problem)
    out = check_output("output", keys["output"], command="convert", inputs=[("input", path)])
    convert_gguf(path, out, dtype=DTYPES[dtype], replace=True)
    write_run(out, command="convert", input=str(path.resolve()), dtype=dtype)  # a rerun may replace it
    return out
