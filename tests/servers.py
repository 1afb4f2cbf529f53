"""Real servers for tests: a tiny chat model folder and `transformers serve` run as a subprocess on
127.0.0.1, started, killed, restarted and stopped by the test, every wait bounded in time."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from align_kit.models.loading import build_byte_tokenizer, build_tiny_gpt2

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
SERVING_MISSING = (
    "transformers serve needs the serving extra (fastapi, uvicorn): pip install -e '.[dev]' installs it"
)


def serving_missing() -> str | None:
    """Why `transformers serve` cannot run here, or None when it can."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    return f"{SERVING_MISSING} (missing: {', '.join(missing)})" if missing else None


def build_chat_model(path: Path, answer: str = "1", chat_template: bool = True) -> Path:
    """A tiny GPT-2 (byte tokenizer, 256 positions) whose every next token is ``answer``, a single byte:
    the final layer norm is zeroed and its bias points at that token's (tied) embedding, so greedy
    decoding says ``answer`` once per generated token whatever the prompt."""
    model, tokenizer = build_tiny_gpt2(), build_byte_tokenizer()
    with torch.no_grad():
        target = model.transformer.wte.weight[tokenizer.convert_tokens_to_ids(answer)].clone()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(100 * target)
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on right now (connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TransformersServe:
    """`transformers serve MODEL` on 127.0.0.1 in a subprocess; its output goes to ``log``.

    ``start`` waits until ``/health`` answers (at most ``startup_timeout`` seconds, failing with the log's
    tail); ``kill`` ends it at once (SIGKILL, as a crash would); ``restart`` starts it again on the same
    port; ``stop`` ends it politely, then by force. Use it as a context manager.
    """

    def __init__(self, model: Path, log: Path, port: int | None = None, startup_timeout: float = 180.0):
        self.model, self.log, self.port = model, log, port or free_port()
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.startup_seconds: list[float] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> TransformersServe:
        missing = serving_missing()
        if missing:
            raise RuntimeError(missing)
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1", OMP_NUM_THREADS="1")
        env.update(TOKENIZERS_PARALLELISM="false", HF_HOME=str(self.log.parent / "hf_home"))
        command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(self.model)]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"]
        started = time.monotonic()
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(started + self.startup_timeout)
        self.startup_seconds.append(time.monotonic() - started)
        return self

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"transformers serve exited ({self.process.returncode}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"transformers serve not ready after {self.startup_timeout} s:\n{self.log_tail()}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def restart(self) -> TransformersServe:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 30) -> str:
        return (
            "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""
        )

    def __enter__(self) -> TransformersServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
