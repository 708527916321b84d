"""`mlra serve`: transformers' OpenAI-style server with continuous batching, on one of our folders, queried over HTTP
on localhost by concurrent clients."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from modeling_mlra import MLRAForCausalLM

pytest.importorskip("fastapi", reason="transformers serve needs transformers[serving] (the `serve` extra)")
pytest.importorskip("uvicorn", reason="transformers serve needs transformers[serving] (the `serve` extra)")

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "models" / "tiny_mla"
PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\n"]
MAX_TOKENS = 12


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("serve") / "server.log").open("w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, "-m", "modeling_mlra", "serve", str(FOLDER), "--device", "cpu", "--port", str(port),
         "--cb-num-blocks", "64"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, f"mlra serve exited early; see {log.name}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"mlra serve did not answer within 4 minutes; see {log.name}"
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_concurrent_completions_over_http_equal_greedy_generate(server_url):
    body = lambda prompt: dict(model=str(FOLDER), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)  # noqa: E731
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda prompt: post(f"{server_url}/v1/completions", body(prompt)), PROMPTS))
    tokenizer = AutoTokenizer.from_pretrained(FOLDER)
    model = MLRAForCausalLM.from_pretrained(FOLDER).eval()
    for prompt, answer in zip(PROMPTS, answers):
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            tokens = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=MAX_TOKENS,
                                    do_sample=False)[0, input_ids.shape[1]:]
        assert answer["usage"]["completion_tokens"] == MAX_TOKENS
        assert answer["choices"][0]["text"] == tokenizer.decode(tokens, skip_special_tokens=True), prompt
