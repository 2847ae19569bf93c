"""`jpaged generate` end to end in a subprocess, on the tiny random-weight demo
model (the default model, SmolLM2, is tested in test_gguf.py)."""

import json
import os
import subprocess
import sys


def test_generate_demo_model_end_to_end(tmp_path, monkeypatch):
    from jpaged.tiny import demo_model_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    demo = demo_model_path()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "The capital of France is", "max_tokens": 5},
        {"prompt": "Once upon a time", "temperature": 0.8, "seed": 3, "n": 2},
        {"prompt": "Café 你好", "stop": ["a"]},
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "jpaged.cli", "generate", "--model", demo,
         "--prompts-file", str(prompts), "--prompt", "Hello", "--max-tokens", "8", "--max-num-seqs", "8",
         "--max-num-batched-tokens", "64", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isdir(tmp_path / "cache" / "jpaged" / "demo-llama-v1")
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 5  # 4 prompts, one of them with n=2
    by_prompt = {}
    for r in recs:
        by_prompt.setdefault(r["prompt"], []).append(r)
    assert len(by_prompt["The capital of France is"][0]["token_ids"]) == 5
    assert len(by_prompt["Once upon a time"]) == 2
    assert len(by_prompt["Hello"][0]["token_ids"]) == 8
    assert "a" not in by_prompt["Café 你好"][0]["text"]
    assert "Summary: 4 requests" in proc.stderr
    assert "output tokens/s" in proc.stderr and "prefix cache hit rate" in proc.stderr


def test_generate_bad_flag_value_is_a_clear_error(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "jpaged.cli", "generate", "--prompt", "x", "--top-p", "0",
         "--model", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "top_p=0" in proc.stderr


def test_chat_keeps_the_conversation(tmp_path, llama_dir):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "jpaged.cli", "chat", "--model", llama_dir, "--max-tokens", "5",
         "--max-num-seqs", "2", "--max-num-batched-tokens", "64", "--max-model-len", "256",
         "--system", "be brief"],
        input="hello\n\nhello\n/reset\nhello\n", env=env, capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    replies = [line for line in proc.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 3  # the blank line is skipped
    # Greedy decoding: after /reset the same question gets the first answer again.
    assert replies[2] == replies[0]
