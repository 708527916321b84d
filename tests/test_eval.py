"""`mlra eval ppl` (the authors' perplexity protocol) and `mlra eval tasks` (lm-eval), offline on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoTokenizer  # noqa: E402

from modeling_mlra import MLRAForCausalLM  # noqa: E402
from modeling_mlra.cli import DEFAULT_MODEL, main  # noqa: E402
from modeling_mlra.data import tokenize_texts, write_bin_tokens  # noqa: E402

REFERENCE_DIR = ROOT / "tests" / "fixtures" / "reference"
EVAL_DIR = REFERENCE_DIR / "eval"
EXPECTED = json.loads((EVAL_DIR / "expected.json").read_text())
EVAL_FILES = sorted(EVAL_DIR.glob("*.bin"))
PROTOCOL = ["--block-size", str(EXPECTED["block_size"]), "--batch-size", str(EXPECTED["batch_size"])]

# Tiny lm-eval tasks, one per request type, on Python snippets the embedded model knows.
CHOICES = [
    {"question": "def add(a, b):\n    return", "choices": ["a + b", "a - b", "None"], "label": 0},
    {"question": "import", "choices": ["os", "zzz", "("], "label": 0},
    {"question": "for i in", "choices": ["range(10):", "5", "def"], "label": 0},
]
PROMPTS = [
    {"prompt": "def add(a, b):\n", "answer": "    return a + b"},
    {"prompt": "import os\nimport", "answer": " sys"},
    {"prompt": "class Stack:\n    def", "answer": " __init__(self):"},
]
DOCUMENTS = [
    {"text": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"},
    {"text": "import os\nprint(os.getcwd())\n"},
]
MAX_GEN_TOKS = 8
TASK_YAML = {
    "tiny_choice": """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
""",
    "tiny_generate": f"""output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {MAX_GEN_TOKS}
  do_sample: false
metric_list:
  - metric: exact_match
""",
    "tiny_rolling": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
""",
}
TASK_DOCS = {"tiny_choice": CHOICES, "tiny_generate": PROMPTS, "tiny_rolling": DOCUMENTS}
TASKS = ",".join(TASK_YAML)


def run_main(*args):
    """`mlra ARGS` in this process; the exit code (0 when main returns)."""
    try:
        main([str(arg) for arg in args])
    except SystemExit as exit:
        return exit.code
    return 0


# ----------------------------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("variant", sorted(EXPECTED["results"]))
def test_ppl_command_reproduces_the_authors_eval_ppl_for_every_reference_variant(variant, tmp_path):
    output = tmp_path / "ppl.json"
    code = run_main(
        "eval", "ppl", "--model", REFERENCE_DIR / variant, "--data", *EVAL_FILES, *PROTOCOL,
        "--device", "cpu", "--no-progress", "--output-json", output,
    )  # fmt: skip
    assert code == 0
    results = json.loads(output.read_text())
    for name, expected in EXPECTED["results"][variant].items():
        assert results[name]["batches"] == expected["batches"]
        assert results[name]["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert results[name]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)


def test_ppl_of_text_and_jsonl_files_equals_ppl_of_the_bin_file_of_their_tokens(tmp_path):
    texts = [document["text"] for document in DOCUMENTS] * 8
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    (tmp_path / "code.txt").write_text("".join(texts))
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    write_bin_tokens(tmp_path / "documents.bin", tokenize_texts(texts, tokenizer))
    write_bin_tokens(tmp_path / "one_document.bin", tokenize_texts(["".join(texts)], tokenizer))
    output = tmp_path / "ppl.json"
    files = [tmp_path / name for name in ("code.jsonl", "documents.bin", "code.txt", "one_document.bin")]
    assert run_main("eval", "ppl", "--data", *files, "--block-size", "32", "--batch-size", "2", "--device", "cpu",
                    "--no-progress", "--output-json", output) == 0  # fmt: skip
    results = json.loads(output.read_text())
    assert results["code.jsonl"] == results["documents.bin"]
    assert results["code.txt"] == results["one_document.bin"]


def test_max_tokens_limits_the_number_of_whole_batches(tmp_path):
    output = tmp_path / "ppl.json"
    assert run_main("eval", "ppl", "--model", REFERENCE_DIR / "mla", "--data", EVAL_FILES[0], *PROTOCOL,
                    "--max-tokens", "100", "--device", "cpu", "--no-progress", "--output-json", output) == 0  # fmt: skip
    assert json.loads(output.read_text())[EVAL_FILES[0].name]["batches"] == 100 // (16 * 2)


def header(magic=20240520, version=1, count=10):
    values = np.zeros(256, dtype=np.int32)
    values[:3] = magic, version, count
    return values.tobytes()


BAD_FILES = {
    "wrong_magic.bin": (header(magic=12345) + np.arange(10, dtype=np.uint16).tobytes(), "magic"),
    "truncated.bin": (header(count=1000) + np.arange(10, dtype=np.uint16).tobytes(), "1000 tokens"),
    "out_of_vocabulary.bin": (header(count=64) + np.full(64, 128, dtype=np.uint16).tobytes(), "token id 128"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_ppl_rejects_a_bad_token_file_in_one_line_naming_it(name, tmp_path, capsys):
    content, reason = BAD_FILES[name]
    (tmp_path / name).write_bytes(content)
    output = tmp_path / "ppl.json"
    code = run_main("eval", "ppl", "--model", REFERENCE_DIR / "mla", "--data", EVAL_FILES[0], tmp_path / name,
                    *PROTOCOL, "--device", "cpu", "--output-json", output)  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1 and str(tmp_path / name) in error and reason in error
    assert not output.exists()


def test_ppl_rejects_a_file_shorter_than_one_batch_before_evaluating_any(tmp_path, capsys):
    code = run_main("eval", "ppl", "--model", REFERENCE_DIR / "mla", "--data", *EVAL_FILES, "--device", "cpu",
                    "--block-size", "1024", "--batch-size", "2")  # fmt: skip
    error = capsys.readouterr()
    assert code == 2 and "fewer than one batch of 2 x 1024" in error.err and str(EVAL_FILES[0]) in error.err
    assert "loss" not in error.out


def test_ppl_rejects_a_missing_file_in_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "missing.bin"
    code = run_main("eval", "ppl", "--model", REFERENCE_DIR / "mla", "--data", missing, "--device", "cpu")
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and str(missing) in error


# ------------------------------------------------------------------------------------------------ lm-eval tasks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The embedded model and its tokenizer saved with save_pretrained: config auto_map and the modeling files."""
    folder = tmp_path_factory.mktemp("model")
    MLRAForCausalLM.from_pretrained(DEFAULT_MODEL).save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEFAULT_MODEL).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A folder of task YAML files (for --include-path) with their documents as jsonl."""
    folder = tmp_path_factory.mktemp("tasks")
    for task, body in TASK_YAML.items():
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in TASK_DOCS[task]))
        source = f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (folder / f"{task}.yaml").write_text(source + body)
    return folder


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def loglikelihood(model, context_ids, continuation_ids):
    """log p(continuation | context) from the model's logits on the whole sequence."""
    ids = torch.tensor([context_ids + continuation_ids])
    log_probs = model(input_ids=ids, use_cache=False).logits[0].float().log_softmax(-1)
    positions = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
    return log_probs[positions, torch.tensor(continuation_ids)].sum().item()


def choice_loglikelihoods(model, tokenizer, doc):
    # lm-eval scores " " + choice (its default target_delimiter) after the question.
    context = encode(tokenizer, doc["question"])
    whole = [encode(tokenizer, f"{doc['question']} {choice}") for choice in doc["choices"]]
    return [loglikelihood(model, context, ids[len(context) :]) for ids in whole]


@pytest.fixture(scope="module")
def direct(model_dir):
    """What each request of the tiny tasks must score, computed from the model's logits and generate()."""
    model = MLRAForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def rolling(doc):
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return loglikelihood(model, [prefix], encode(tokenizer, doc["text"]))

    @torch.no_grad()
    def generation(doc):
        ids = torch.tensor([encode(tokenizer, doc["prompt"])])
        output = model.generate(input_ids=ids, max_new_tokens=MAX_GEN_TOKS, do_sample=False)
        return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]

    return {
        "tiny_choice": [choice_loglikelihoods(model, tokenizer, doc) for doc in CHOICES],
        "tiny_rolling": [rolling(doc) for doc in DOCUMENTS],
        "tiny_generate": [generation(doc) for doc in PROMPTS],
    }


def check_samples(samples, direct):
    """lm-eval's per-document responses (as written to JSON) against the direct computation."""
    by_doc = {task: sorted(samples[task], key=lambda sample: sample["doc_id"]) for task in TASK_YAML}
    # lm_eval's samples files hold the numbers as strings.
    for sample, expected in zip(by_doc["tiny_choice"], direct["tiny_choice"], strict=True):
        scores = [float(response[0][0]) for response in sample["resps"]]
        assert scores == pytest.approx(expected, rel=1e-4, abs=1e-4)
    for sample, expected in zip(by_doc["tiny_rolling"], direct["tiny_rolling"], strict=True):
        assert float(sample["resps"][0][0]) == pytest.approx(expected, rel=1e-4, abs=1e-4)
    for sample, expected in zip(by_doc["tiny_generate"], direct["tiny_generate"], strict=True):
        assert sample["filtered_resps"][0] == expected


def test_tasks_command_scores_every_request_type_as_the_model_does(model_dir, task_dir, direct, tmp_path):
    output = tmp_path / "results.json"
    code = run_main(
        "eval", "tasks", "--model", model_dir, "--tasks", TASKS, "--include-path", task_dir, "--batch-size", "2",
        "--device", "cpu", "--log-samples", "--output-json", output,
    )  # fmt: skip
    assert code == 0
    results = json.loads(output.read_text())
    assert sorted(results["results"]) == sorted(TASK_YAML)
    check_samples(results["samples"], direct)


def test_lm_eval_hf_model_with_remote_code_scores_a_saved_folder_without_our_package(
    model_dir, task_dir, direct, tmp_path
):
    # A package of our name that fails on import, first on the path: the run must never import ours.
    poison = tmp_path / "poison" / "modeling_mlra"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('the lm_eval run imported modeling_mlra')\n")
    environment = {
        **os.environ,
        "PYTHONPATH": str(poison.parent),
        "OMP_NUM_THREADS": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
    }
    command = [
        sys.executable, "-m", "lm_eval", "run", "--model", "hf",
        "--model_args", f"pretrained={model_dir},trust_remote_code=True,dtype=float32",
        "--tasks", TASKS, "--include_path", str(task_dir), "--batch_size", "2", "--device", "cpu",
        "--output_path", str(tmp_path / "out"), "--log_samples",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = {}
    for task in TASK_YAML:
        (path,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    check_samples(samples, direct)


def test_mlra_model_is_registered_with_lm_eval_and_generates_with_the_mlra_cache(model_dir, task_dir, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import modeling_mlra.eval.lm_eval_model  # noqa: F401  (registers "mlra")
    from modeling_mlra import MLRACache
    from modeling_mlra.modeling_mlra import CACHE_FIELD

    caches = []
    original = MLRAForCausalLM._prepare_cache_for_generation

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        model_kwargs = args[1]
        caches.append(type(model_kwargs.get(CACHE_FIELD)))

    monkeypatch.setattr(MLRAForCausalLM, "_prepare_cache_for_generation", record)
    results = lm_eval.simple_evaluate(
        model="mlra",
        model_args=f"pretrained={model_dir},device=cpu",
        tasks=["tiny_generate"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        limit=1,
    )
    assert results["results"]["tiny_generate"]["exact_match,none"] in (0.0, 1.0)
    assert caches and set(caches) == {MLRACache}


def test_mlra_model_class_scores_the_authors_checkpoint_with_its_logits(task_dir, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import modeling_mlra.eval.lm_eval_model  # noqa: F401  (registers "mlra")

    # The authors' folders ship no tokenizer and the fixtures' vocabulary has 128 ids: one token per character.
    characters = Tokenizer(models.WordLevel({"<eos>": 0, **{chr(i): i - 31 for i in range(32, 127)}}, "<eos>"))
    characters.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    characters.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=characters, eos_token="<eos>")
    tokenizer.save_pretrained(tmp_path / "characters")
    checkpoint = REFERENCE_DIR / "mlra_4"
    results = lm_eval.simple_evaluate(
        model="mlra",
        model_args=f"pretrained={checkpoint},tokenizer={tmp_path / 'characters'},device=cpu",
        tasks=["tiny_choice"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size=2,
        log_samples=True,
    )
    model = MLRAForCausalLM.from_pretrained(checkpoint).eval()
    samples = sorted(results["samples"]["tiny_choice"], key=lambda sample: sample["doc_id"])
    for sample, doc in zip(samples, CHOICES, strict=True):
        scores = [response[0][0] for response in sample["resps"]]
        assert scores == pytest.approx(choice_loglikelihoods(model, tokenizer, doc), rel=1e-4, abs=1e-4)


def test_tasks_command_rejects_an_unknown_task_in_one_line(task_dir, capsys, monkeypatch):
    import lm_eval.tasks

    class WithoutBuiltinTasks(lm_eval.tasks.TaskManager):
        """Indexing lm-eval's own tasks takes a minute; the unknown name is unknown to them as well."""

        def __init__(self, include_path=None, include_defaults=True, **kwargs):
            super().__init__(include_path=include_path, include_defaults=False, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", WithoutBuiltinTasks)
    code = run_main("eval", "tasks", "--tasks", "tiny_choice,no_such_task", "--include-path", task_dir)
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "no_such_task" in error


# ------------------------------------------------------------------------------------------- the paper's tables


def test_paper_task_list_resolves_in_lm_eval_with_the_paper_metrics():
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    from modeling_mlra.eval.paper_results import load_paper_results

    zero_shot = load_paper_results()["zero_shot"]
    # lm-eval's own YAML files of these tasks (indexing all of lm-eval's tasks takes a minute).
    folders = ["arc", "openbookqa", "super_glue/boolq", "hellaswag", "winogrande", "piqa"]
    tasks_root = Path(lm_eval.tasks.__file__).parent
    manager = TaskManager(include_path=[str(tasks_root / f) for f in folders], include_defaults=False)
    for task in zero_shot["tasks"]:
        config = manager.task_index[task].cfg
        assert config["output_type"] == "multiple_choice"
        assert zero_shot["metrics"][task] in [metric["metric"] for metric in config["metric_list"]]
    assert [task for task, metric in zero_shot["metrics"].items() if metric == "acc"] == ["boolq", "winogrande"]


def test_zero_shot_table_lays_out_lm_eval_results_beside_the_paper_row():
    from modeling_mlra.eval.paper_results import load_paper_results
    from modeling_mlra.eval.tables import zero_shot_table

    zero_shot = load_paper_results()["zero_shot"]
    results = {"results": {task: {f"{metric},none": 0.5, "acc,none": 0.25} for task, metric in zero_shot["metrics"].items()}}
    results["results"]["boolq"]["acc,none"] = 0.75
    lines = zero_shot_table(results, "my_model", "mlra_4").splitlines()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["Model", "ARC-E", "ARC-C", "OpenBookQA", "BoolQ", "HellaSwag", "Winogrande", "PIQA", "Avg"]
    assert cells[2] == ["my_model", "50.00", "50.00", "50.00", "75.00", "50.00", "25.00", "50.00", "50.00"]
    assert cells[3] == ["MLRA-4 (paper)", "67.63", "41.38", "43.00", "61.74", "62.16", "61.48", "74.48", "58.84"]


def test_perplexity_table_puts_the_paper_values_under_the_files_of_its_datasets():
    from modeling_mlra.eval.tables import perplexity_table

    results = {"C4_eval.bin": {"perplexity": 20.0}, "fineweb-edu.jsonl": {"perplexity": 10.0}, "x.txt": {"perplexity": 3.0}}
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in perplexity_table(results, "m", "mla").splitlines()]
    assert cells[0] == ["Model", "C4", "FineWeb-Edu", "x.txt", "Avg"]
    assert cells[2] == ["m", "20.000", "10.000", "3.000", "11.000"]
    assert cells[3] == ["MLA (paper)", "16.345", "9.284", "-", "-"]


def test_paper_results_rows_average_to_their_reported_avg():
    from modeling_mlra.eval.paper_results import load_paper_results

    paper = load_paper_results()
    for table, columns, precision in (("perplexity", "datasets", 0.0015), ("zero_shot", "tasks", 0.015)):
        for variant, row in paper[table]["rows"].items():
            values = [row[column] for column in paper[table][columns]]
            assert sum(values) / len(values) == pytest.approx(row["avg"], abs=precision), (table, variant)
