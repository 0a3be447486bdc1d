"""The peer side of `quant.py` (no Sapling import, so it runs under either virtualenv):

    python quant_worker.py llmc --model DIR --calibration calib.pt --scheme w4a16|w8a16 [--group-size 64]
                                [--batch-size 1] [--observer minmax|mse] --out DIR
    python quant_worker.py eval --model DIR --blocks val.pt --result result.json

- ``llmc``: llm-compressor's one-shot GPTQ (``GPTQModifier``, its defaults: static activation ordering, block
  128, dampening 0.01) with the ``W4A16`` preset at ``--group-size`` (int4, symmetric, groups along the input),
  or ``W8A16`` made per output channel (Sapling's w8a16 format; the preset's default is groups of 128), on
  exactly the token sequences of ``--calibration`` (no shuffling, no re-tokenization), ``lm_head`` ignored,
  saved compressed. ``--observer mse``: the weights' scales from llm-compressor's ``mse`` observer (its defaults)
  instead of the min-max one. Times the quantization and the export, not the loading.
- ``eval``: mean next-token NLL of a checkpoint (16-bit or compressed-tensors, as this environment's
  transformers loads it, computed in float32) over the blocks of ``--blocks``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def llmc(a: argparse.Namespace) -> dict:
    from compressed_tensors.quantization import QuantizationStrategy, preset_name_to_scheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    calib = torch.load(a.calibration)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    scheme = preset_name_to_scheme(a.scheme.upper(), ["Linear"])
    if a.scheme == "w4a16":
        scheme.weights.group_size = a.group_size
    else:
        scheme.weights.strategy, scheme.weights.group_size = QuantizationStrategy.CHANNEL, None
    if a.observer == "mse":
        scheme.weights.observer = "mse"
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe, num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False, batch_size=a.batch_size)
    t_quant = time.perf_counter() - t0
    model.save_pretrained(a.out, save_compressed=True)
    tokenizer.save_pretrained(a.out)
    return {"quantize_s": time.perf_counter() - t0, "oneshot_s": t_quant, "dtype": str(model.dtype),
            "scheme": scheme.model_dump(mode="json")}


def evaluate(a: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    blocks = torch.load(a.blocks)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, blocks.shape[0], a.batch):
            ids = blocks[i : i + a.batch]
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum"))
            count += ids[:, 1:].numel()
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count, "eval_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("llmc")
    q.add_argument("--model", required=True)
    q.add_argument("--calibration", required=True)
    q.add_argument("--scheme", choices=["w4a16", "w8a16"], required=True)
    q.add_argument("--group-size", type=int, default=64)
    q.add_argument("--batch-size", type=int, default=1, help="calibration batch size (oneshot's default: 1)")
    q.add_argument("--observer", choices=["minmax", "mse"], default="minmax",
                   help="how the weights' scales are chosen (llm-compressor's default: min-max)")
    q.add_argument("--out", required=True)
    q.add_argument("--result", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--model", required=True)
    e.add_argument("--blocks", required=True)
    e.add_argument("--batch", type=int, default=8)
    e.add_argument("--result", required=True)
    a = p.parse_args()
    result = llmc(a) if a.cmd == "llmc" else evaluate(a)
    Path(a.result).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
