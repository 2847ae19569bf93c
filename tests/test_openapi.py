"""``/openapi.json`` describes the server, and the server keeps to it: a
schemathesis run (its CLI, bounded in examples and time) against the live
tiny-model server finds no 5xx, no undocumented status or content type, and
no response (JSON or Server-Sent Event) that contradicts the schema."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from serve_helpers import API_KEY, shared_server


@pytest.fixture(scope="module")
def server(llama_dir):
    return shared_server(llama_dir)


def test_openapi_json_lists_every_route(server):
    r = httpx.get(server.url + "/openapi.json")  # public, like /health
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/health", "/version", "/v1/models", "/metrics",
                                 "/openapi.json", "/tokenize", "/detokenize",
                                 "/v1/completions", "/v1/chat/completions"}
    post = doc["paths"]["/v1/completions"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/CompletionRequest")
    assert {"200", "400", "500", "503"} <= set(post["responses"])
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "deadline_ms", "logit_bias", "n"} <= set(props)
    assert doc["security"] == [{"bearer": []}]  # the shared server has API keys


def test_schemathesis_finds_nothing(server, tmp_path):
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
           "-H", f"Authorization: Bearer {API_KEY}",
           "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
           "response_schema_conformance",
           "--max-examples", "12", "--max-time", "75", "--seed", "7", "--workers", "1",
           "--request-timeout", "30", "--warnings", "off", "--no-color"]
    env = dict(os.environ, SCHEMATHESIS_HOOKS=str(Path(__file__).with_name("schemathesis_hooks.py")))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    out = p.stdout + p.stderr
    assert "Tested: 8" in out, out[-3000:]  # every operation but /openapi.json's own GET
    assert p.returncode == 0, out[-6000:]
    assert "generated" in out and "failure" not in out.split("Test cases:")[-1], out[-3000:]
