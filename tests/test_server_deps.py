"""A clean install runs ``jpaged chat`` and serves a chat request.

The environment is built from pyproject's runtime ``dependencies`` only:
their transitive requirements (extras excluded unless a requirement names
them) are read with `importlib.metadata`, and each distribution's top-level
files are linked into one directory that a ``python -S`` subprocess sees as
its only site-packages. Anything installed here but not declared (jinja2
before it was declared: transformers pulls it in only through an extra) is
absent there, as on a fresh machine. Linking takes well under a second,
where a venv with ``pip install`` would need the network and minutes.
"""

import json
import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import httpx
from packaging.requirements import Requirement
from serve_helpers import free_port, wait_healthy

ROOT = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_closure() -> set[str]:
    """Distributions reachable from pyproject's runtime dependencies."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [(Requirement(d), frozenset(Requirement(d).extras)) for d in deps]
    todo = [(r.name, ex) for r, ex in todo if r.marker is None or r.marker.evaluate()]
    seen: dict[str, set] = {}
    while todo:
        name, extras = todo.pop()
        key = _norm(name)
        if key in seen and extras <= seen[key]:
            continue
        seen.setdefault(key, set()).update(extras)
        for spec in metadata.requires(name) or []:
            r = Requirement(spec)
            envs = [{"extra": e} for e in ("", *extras)]
            if r.marker is None or any(r.marker.evaluate(env) for env in envs):
                todo.append((r.name, frozenset(r.extras)))
    return set(seen)


def clean_site(dest: Path) -> Path:
    """A directory holding jpaged and exactly the declared closure."""
    dest.mkdir()
    for name in sorted(declared_closure()):
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or []} - {".."}
        for top in tops:
            src = Path(dist.locate_file(top))
            if src.exists() and not (dest / top).exists() and not top.endswith(".pth"):
                (dest / top).symlink_to(src)
    (dest / "jpaged").symlink_to(ROOT / "jpaged")
    return dest


def _clean_env(site: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return {**env, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1", "JAX_PLATFORMS": "cpu"}


def _python(site: Path) -> list[str]:
    return [sys.executable, "-S"]  # -S: no site-packages but ours


def test_closure_excludes_undeclared_packages():
    closure = declared_closure()
    assert {"jax", "transformers", "tokenizers", "starlette", "uvicorn"} <= closure
    assert "torch" not in closure and "pytest" not in closure  # test extras stay out


ENGINE = ["--max-num-seqs", "2", "--max-num-batched-tokens", "64", "--max-model-len", "256"]


def test_clean_install_chats_and_serves_chat(tmp_path, llama_dir):
    site = clean_site(tmp_path / "site")
    env = _clean_env(site)
    probe = subprocess.run(_python(site) + ["-c", "import torch"], env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    assert probe.returncode != 0  # the environment really is restricted
    proc = subprocess.run(
        _python(site) + ["-m", "jpaged.cli", "chat", "--model", llama_dir, "--max-tokens", "3",
                         *ENGINE], input="hello\n", env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("assistant> ") == 1

    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    srv = subprocess.Popen(
        _python(site) + ["-m", "jpaged.cli", "serve", "--model", llama_dir, "--port", str(port),
                         "--served-model-name", "m", *ENGINE], env=env, cwd=tmp_path,
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [(srv, tmp_path / "serve.log")], 240)
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        body = json.loads(r.text)
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] >= 1
    finally:
        srv.terminate()
        srv.wait(60)
        log.close()
