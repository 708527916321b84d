#!/usr/bin/env bash
# GPU check of `mlra eval`, offline, on the two small trained family models shipped in the repository (the embedded
# MLRA-4 and models/tiny_mla): lm-eval tasks of each request type built from held-out Python (multiple choice,
# generate_until, loglikelihood_rolling), then the perplexity protocol in bf16 at batch 16 (and float32 for
# reference) on a text file and on the authors' .bin format. Every step's output goes to OUT/<step>.log and its
# wall time to OUT/times.tsv.
#
#     bash eval/device_check.sh OUT [DEVICE]        # DEVICE defaults to cuda
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash eval/device_check.sh OUT [DEVICE]}
DEVICE=${2:-cuda}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_DATASETS_CACHE="$OUT/datasets_cache" TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
HELDOUT=tests/fixtures/heldout_python.txt
printf 'step\tseconds\n' > "$OUT/times.tsv"

run() {  # run STEP COMMAND...: log the output, record the wall time
    local step=$1 start end
    shift
    echo "== $step: $*"
    start=$(date +%s.%N)
    "$@" 2>&1 | tee "$OUT/$step.log"
    end=$(date +%s.%N)
    awk -v step="$step" -v start="$start" -v end="$end" 'BEGIN { printf "%s\t%.2f\n", step, end - start }' \
        >> "$OUT/times.tsv"
}

# Tasks and data from the held-out Python file: lm-eval YAML + jsonl, and the file as an authors'-format .bin.
python - "$OUT" "$HELDOUT" <<'EOF'
import json, sys
from pathlib import Path
from transformers import AutoTokenizer
from modeling_mlra.cli import DEFAULT_MODEL
from modeling_mlra.data import tokenize_texts, write_bin_tokens

out, heldout = Path(sys.argv[1]), Path(sys.argv[2])
text = heldout.read_text()
lines = [line for line in text.splitlines() if len(line.strip()) > 20]
tasks = out / "tasks"
tasks.mkdir(exist_ok=True)
docs = {
    "heldout_choice": [
        {"question": a[: len(a) // 2], "choices": [a[len(a) // 2 :], b[len(b) // 2 :], c[len(c) // 2 :]], "label": 0}
        for a, b, c in zip(lines[:200], lines[7:207], lines[13:213])
    ],
    "heldout_generate": [{"prompt": line[: len(line) // 2], "answer": line[len(line) // 2 :]} for line in lines[:100]],
    "heldout_rolling": [{"text": text[i : i + 2000]} for i in range(0, len(text), 2000)],
}
bodies = {
    "heldout_choice": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
    "doc_to_target: label\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "heldout_generate": 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
    'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 32\n  do_sample: false\n'
    "metric_list:\n  - metric: exact_match\n",
    "heldout_rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
    "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
}
for task, body in bodies.items():
    (tasks / f"{task}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs[task]))
    head = f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / task}.jsonl\n"
    (tasks / f"{task}.yaml").write_text(head + "test_split: test\n" + body)
write_bin_tokens(out / "heldout_python.bin", tokenize_texts([text], AutoTokenizer.from_pretrained(DEFAULT_MODEL)))
EOF

run environment python -c "import torch, transformers; print(torch.__version__, transformers.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
# The task runs need lm-eval (the `eval` extra); the perplexity runs do not.
TASKS="heldout_choice heldout_generate heldout_rolling"
if ! python -c "import lm_eval" 2>/dev/null; then
    echo "lm-eval is not installed: the task runs are skipped" | tee "$OUT/tasks_skipped.log"
    TASKS=""
fi
for model in modeling_mlra/default_model models/tiny_mla; do
    name=$(basename "$model")
    for task in $TASKS; do
        run "tasks_${name}_${task}_bf16" python -m modeling_mlra eval tasks --model "$model" --tasks "$task" \
            --include-path "$OUT/tasks" --batch-size 16 --device "$DEVICE" --dtype bf16 \
            --output-json "$OUT/tasks_${name}_${task}_bf16.json"
    done
    for dtype in bf16 fp32; do
        run "ppl_${name}_${dtype}" python -m modeling_mlra eval ppl --model "$model" \
            --data "$HELDOUT" "$OUT/heldout_python.bin" --block-size 128 --batch-size 16 \
            --device "$DEVICE" --dtype "$dtype" --output-json "$OUT/ppl_${name}_${dtype}.json"
    done
done
echo "== times (s)"
cat "$OUT/times.tsv"
