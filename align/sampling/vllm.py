"""vLLM sampling backend: a colocated engine or a localhost server, kept in sync with the LoRA policy.

Two ways to make vLLM sample from the current policy (``sync``):

- ``"merged"``: push every base weight with the adapter merged in as peft merges it (``W + s·B·A`` with
  s = α/r, or α/√r for rsLoRA; DoRA's magnitude times the column-normalised ``W + s·B·A``), under the
  base checkpoint's names (the PEFT → vLLM name mapping TRL uses). The merge is computed out of place,
  so the training model is never merged and unmerged: its base weights stay bit-exact, which the
  in-place merge/unmerge round trip does not guarantee in bf16.
- ``"adapter"``: save only the LoRA tensors and hand them to vLLM as a new LoRA request (fresh name
  and id per sync). Far less data than the whole model, at some per-token cost for the LoRA kernels.
  vLLM's LoRA layers express plain LoRA and rsLoRA, not DoRA (refused, see ``adapter_sync_problem``).
  For PiSSA/OLoRA the engine first gets the policy's residual base weights.

Why not ``trl.generation.vllm_generation.VLLMGeneration`` (trl 1.16 with vLLM 0.32; checked on CPU):
its colocate engine starts, generates and syncs, but (1) it builds ``LLM(...)`` with fixed
arguments: no ``enable_lora`` (adapter-only sync is impossible), no ``dtype`` (the fp32 parity check)
and no ``enforce_eager``/KV-cache size (CPU start-up and memory); (2) its colocate ``generate`` sends
one ``SamplingParams`` for rows already repeated ``n`` times, so a per-request seed would make the
``n`` samples of a prompt identical; (3) its server mode syncs weights only through vLLM's NCCL
weight-transfer engine, which needs CUDA (``VLLMClient.init_communicator`` raises otherwise), and its
constructor calls it, so server mode cannot start without a GPU. The adapter below is the smallest
that fixes these: an in-process engine as TRL builds it (``external_launcher``) and vLLM's own
``reload_weights`` worker method, called in process, or over HTTP with a safetensors snapshot uploaded to the
server (so the server may run on another machine; see ``align.sampling.vllm_server`` for its API key).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from align.sampling.base import Completions, SamplingParams, derive_seed

SyncMode = Literal["merged", "adapter"]
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank
CPU_KV_CACHE_BYTES = 1 << 30


def lora_rank_bucket(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of rank ``rank``."""
    for bucket in LORA_RANKS:
        if bucket >= rank:
            return bucket
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {LORA_RANKS[-1]}")


def adapter_rank(model: torch.nn.Module) -> int:
    """The largest LoRA rank of the active adapter (including per-module ``rank_pattern`` overrides)."""
    config = model.peft_config[model.active_adapter]
    return max([config.r, *config.rank_pattern.values()])


def vllm_weights(model: torch.nn.Module, *, merge: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under the base checkpoint's names, as vLLM loads them.

    With ``merge`` each LoRA-wrapped weight is returned merged with its active adapters (``_merged_weight``),
    without touching ``model``; without it, the policy's frozen base weights (for PiSSA/OLoRA adapters the
    residual peft made, not the checkpoint's). LoRA tensors themselves are skipped.
    """
    if not isinstance(model, PeftModel):
        yield from ((name, param.detach()) for name, param in model.named_parameters())
        return
    adapter = model.active_adapter
    lora_of = {id(m.get_base_layer().weight): m for m in model.modules() if isinstance(m, LoraLayer)}
    for name, param in model.named_parameters():
        if "lora_" in name or ".original_module." in name:
            continue
        name = (name.removeprefix("base_model.model.").replace(".base_layer", "")
                .replace(f".modules_to_save.{adapter}", ""))
        tensor = param.detach()
        layer = lora_of.get(id(param))
        if merge and layer is not None and not layer.disable_adapters:
            tensor = _merged_weight(layer, tensor)
        yield name, tensor


def _merged_weight(layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with the layer's active, unmerged adapters merged in, as peft's safe merge computes it
    (``Linear.merge(safe_merge=True)``) but out of place: plain LoRA adds ``get_delta_weight`` (α/r or, with
    rsLoRA, α/√r times B·A), summed in fp32 and rounded once; a variant (DoRA: the magnitude vector times
    W + ΔW normalised per output) uses peft's own ``merge_safe``. The layer is left as it was."""
    adapters = [a for a in layer.active_adapters if a in layer.scaling and a not in layer.merged_adapters]
    if any(layer.lora_bias.get(a) for a in adapters) or not weight.is_floating_point():
        raise NotImplementedError("merged sync supports LoRA and DoRA on float weights (no lora_bias or quantized "
                                  "base)")
    if len(adapters) > 1 and any(a in layer.lora_variant for a in adapters):
        # merge_safe merges into the layer's own base weight, which out of place holds no earlier adapter
        raise NotImplementedError("merged sync of several active adapters supports plain LoRA only")
    caches = set(layer._caches)
    with torch.no_grad():
        merged = weight.float()
        for a in adapters:
            variant = layer.lora_variant.get(a)
            if variant is None:
                merged = merged + layer.get_delta_weight(a).float()
            else:
                merged = variant.merge_safe(layer, a, merged)
    for key in set(layer._caches) - caches:  # what merge_safe keeps for an unmerge that never comes (DoRA's norm)
        layer._cache_pop(key)
    return merged.to(weight.dtype)


def adapter_sync_problem(model: torch.nn.Module) -> str | None:
    """Why vLLM cannot sample from ``model`` through a LoRA request (None when it can): vLLM 0.32's LoRA layers
    compute ``x·W + s·x·Aᵀ·Bᵀ`` (s = α/r, or α/√r with ``use_rslora``, which vLLM reads from
    adapter_config.json), so they have no DoRA magnitude, no LoRA bias and no other replaced module."""
    if not isinstance(model, PeftModel):
        return "adapter sync needs a PeftModel (a LoRA policy)"
    config = model.peft_config[model.active_adapter]
    if config.modules_to_save:
        return "vLLM LoRA requests cannot carry modules_to_save"
    if config.use_dora:
        return ("vLLM cannot express DoRA adapters (its LoRA kernels have no magnitude vector); merged sync "
                "pushes DoRA's merged weights exactly")
    if config.lora_bias:
        return "vLLM does not support LoRA bias (lora_bias)"
    return None


def save_adapter_for_vllm(model: PeftModel, directory: str) -> str:
    """Save the active adapter where vLLM can load it as a LoRA request; returns its directory. Its config says
    ``init_lora_weights: true``: the engine holds the policy's own base weights (for PiSSA/OLoRA, peft's residual
    W − s·B₀A₀), so the adapter is a plain delta on them. (vLLM refuses a PiSSA/OLoRA config, whose base weights
    peft would rebuild from the checkpoint on load.) rsLoRA's ``use_rslora`` is kept: vLLM scales by α/√r."""
    name = model.active_adapter
    model.save_pretrained(directory, selected_adapters=[name])
    path = directory if name == "default" else os.path.join(directory, name)  # PEFT's layout
    config_path = os.path.join(path, "adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["init_lora_weights"] = True
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return path


@dataclass(frozen=True)
class _Adapter:
    name: str
    id: int
    path: str


def _request_params(params: SamplingParams, prompt_index: int) -> dict:
    """vLLM sampling arguments for one prompt. The prompt's seed is derived from the batch seed and its index,
    and vLLM's parallel sampling adds the sample index to it, so every sample of every batch has its own seed."""
    seed = None if params.seed is None else derive_seed(params.seed, prompt_index)
    return {"n": params.n, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
            "top_p": params.top_p, "top_k": params.top_k, "logprobs": 0, "seed": seed}


class _LocalEngine:
    """``vllm.LLM`` in this process. With one device it runs in process (``external_launcher``, as
    TRL does), so weights are pushed straight from memory; with tensor parallelism vLLM runs the
    shards in its own worker processes and weights go through a safetensors snapshot."""

    def __init__(self, model_path: str, *, dtype: str, tensor_parallel_size: int, gpu_memory_utilization: float,
                 max_model_len: int | None, seed: int, max_lora_rank: int | None, enforce_eager: bool | None):
        from trl.trainer.utils import ensure_master_addr_port
        from vllm import LLM
        from vllm.platforms import current_platform

        self.in_process = tensor_parallel_size == 1
        self.lora = max_lora_rank is not None
        if self.in_process:
            # external_launcher joins the caller's torch.distributed world; a plain process is rank 0 of 1.
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
            ensure_master_addr_port()
        cpu = current_platform.is_cpu()
        extra = {}
        if cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            # On CPU vLLM otherwise reserves gpu_memory_utilization × all RAM for itself (and refuses to
            # start when other processes hold part of it); 1 GiB of KV cache is plenty for rollouts of a
            # small policy. VLLM_CPU_KVCACHE_SPACE (GiB), when set, takes precedence.
            extra["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        set_num_threads = torch.set_num_threads
        # external_launcher initialises torch.distributed unless the trainer already has; close() undoes only that
        self._owns_process_group = not torch.distributed.is_initialized()
        self.llm = LLM(
            model=model_path, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            distributed_executor_backend="external_launcher" if self.in_process else "mp",
            # log-probs after temperature/top-k/top-p, as Completions documents
            logprobs_mode="processed_logprobs",
            # vLLM's own defaults, not the checkpoint's generation_config.json (repetition penalty, top-k, ...):
            # samples come from π itself, as with the HF sampler
            generation_config="vllm",
            enable_lora=self.lora, max_lora_rank=max_lora_rank or 16, max_loras=1,
            # CPU: eager skips tens of seconds of inductor compilation at start-up
            enforce_eager=cpu if enforce_eager is None else enforce_eager,
            **extra,
        )
        # vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op once it has bound its
        # threads; colocated, that process is also the trainer, which keeps the right to set its threads.
        torch.set_num_threads = set_num_threads

    def _lora(self, adapter: _Adapter | None):
        from vllm.lora.request import LoRARequest

        return None if adapter is None else LoRARequest(adapter.name, adapter.id, adapter.path)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, adapter: _Adapter | None):
        from vllm import SamplingParams as VLLMParams

        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids],
            [VLLMParams(**_request_params(params, p), detokenize=False) for p in range(len(prompt_ids))],
            lora_request=self._lora(adapter), use_tqdm=False,
        )
        return [[(list(s.token_ids), [step[t].logprob for t, step in zip(s.token_ids, s.logprobs)])
                 for s in out.outputs] for out in outputs]

    def prompt_logprobs(self, sequences: list[list[int]], adapter: _Adapter | None) -> list[list[float]]:
        from vllm import SamplingParams as VLLMParams

        params = VLLMParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        # An engine with LoRA support (vLLM 0.32, CPU LoRA kernels) indexes the LoRA logits of a batch per
        # request, not per prompt position, so the prompt log-probs of several prompts in one batch fail
        # with a shape error, adapter or not; one prompt at a time works. Only this check pays for it.
        batches = [[s] for s in sequences] if self.lora else [sequences]
        outputs = [out for batch in batches for out in self.llm.generate(
            [{"prompt_token_ids": s} for s in batch], params, lora_request=self._lora(adapter), use_tqdm=False)]
        return [[step[t].logprob for t, step in zip(s[1:], out.prompt_logprobs[1:])]
                for s, out in zip(sequences, outputs)]

    def load_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Straight from the trainer's memory; in-process engines only."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def load_weights_from(self, path: str) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        self.llm.reset_prefix_cache()

    def load_adapter(self, adapter: _Adapter) -> None:
        # Loaded now rather than on the first request, so that a bad adapter fails the sync.
        self.llm.llm_engine.add_lora(self._lora(adapter))

    def unload_adapter(self, adapter: _Adapter) -> None:
        self.llm.llm_engine.remove_lora(adapter.id)

    def close(self) -> None:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        destroy_model_parallel()
        if self._owns_process_group:
            destroy_distributed_environment()


# Sync endpoints are absent (404) from a server started without what weight sync needs.
_SYNC_ENDPOINTS_HINT = ("; weight sync needs a server started by `align serve` (VLLM_SERVER_DEV_MODE=1 for merged "
                        "weights, --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 for adapters)")
API_KEY_ENV = "ALIGN_VLLM_API_KEY"  # the server's key, and the client's when none is given
# `align serve`'s upload route: PUT <route>/<snapshot>/<file> stores a file in the server's snapshot directory
# <snapshot> (answering its path there), DELETE <route>/<snapshot> deletes the directory.
SNAPSHOTS_ROUTE = "/align/snapshots"


class _ServerEngine:
    """HTTP client of a vLLM OpenAI-compatible server started by ``align serve`` (``align.sampling.vllm_server``),
    on this machine or another. Weight snapshots and adapters are uploaded to the server over HTTP, which loads
    them from its own disk. With ``api_key`` every request but ``/health`` carries it as a bearer token."""

    def __init__(self, url: str, *, api_key: str | None, connect_timeout: float, request_timeout: float):
        self.url, self.request_timeout = url, request_timeout
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._uploaded: dict[str, str] = {}  # adapter name -> its snapshot on the server
        self._wait_until_up(connect_timeout)
        self.base_name = self._call("GET", "/v1/models")["data"][0]["id"]

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._call("GET", "/health")
                return
            except ConnectionError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)

    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        return self._request(method, path, data, {"Content-Type": "application/json"})

    def _request(self, method: str, path: str, data, headers: dict):
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers | self._auth)
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as e:
            hint = {404: _SYNC_ENDPOINTS_HINT,
                    401: f"; the server needs its API key: set `vllm_api_key` (or {API_KEY_ENV}) to the key it was "
                         "started with"}.get(e.code, "")
            detail = e.read().decode()[:500]
            raise RuntimeError(f"vLLM server {self.url}{path} answered {e.code}: {detail}{hint}") from e
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise ConnectionError(f"vLLM server at {self.url} is not reachable ({e}); is it running? "
                                  "Start it with `align serve`.") from e
        return json.loads(text) if text.strip().startswith(("{", "[")) else text

    def _upload(self, local_dir: str) -> tuple[str, str]:
        """Upload the files of ``local_dir`` into a new snapshot on the server: (its name, its path there)."""
        snapshot = uuid.uuid4().hex
        remote = None
        for entry in sorted(os.scandir(local_dir), key=lambda e: e.name):
            if entry.is_file():
                headers = {"Content-Type": "application/octet-stream", "Content-Length": str(entry.stat().st_size)}
                with open(entry.path, "rb") as f:  # streamed: a merged snapshot can be the whole model
                    remote = self._request("PUT", f"{SNAPSHOTS_ROUTE}/{snapshot}/{entry.name}", f, headers)["path"]
        return snapshot, remote

    def _delete(self, snapshot: str) -> None:
        self._request("DELETE", f"{SNAPSHOTS_ROUTE}/{snapshot}", None, {})

    def _completions(self, body: dict) -> list[dict]:
        return sorted(self._call("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, adapter: _Adapter | None):
        model = self.base_name if adapter is None else adapter.name

        def one(p: int):  # one request per prompt: each has its own seed
            choices = self._completions({"model": model, "prompt": [prompt_ids[p]], "return_token_ids": True,
                                         **_request_params(params, p)})
            return [(c["token_ids"], c["logprobs"]["token_logprobs"]) for c in choices]

        with ThreadPoolExecutor(max_workers=max(1, min(32, len(prompt_ids)))) as pool:
            return list(pool.map(one, range(len(prompt_ids))))

    def prompt_logprobs(self, sequences: list[list[int]], adapter: _Adapter | None) -> list[list[float]]:
        model = self.base_name if adapter is None else adapter.name
        # one sequential request per sequence: the server may have LoRA on (see _LocalEngine.prompt_logprobs)
        choices = [c for batch in ([s] for s in sequences) for c in self._completions(
            {"model": model, "prompt": batch, "max_tokens": 1, "prompt_logprobs": 0})]
        return [[step[str(t)]["logprob"] for t, step in zip(s[1:], c["prompt_logprobs"][1:])]
                for s, c in zip(sequences, choices)]

    def load_weights_from(self, path: str) -> None:
        snapshot, remote = self._upload(path)
        try:
            self._call("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": remote}})
        finally:  # reload_weights has read it (or failed)
            self._delete(snapshot)
        self._call("POST", "/reset_prefix_cache")

    def load_adapter(self, adapter: _Adapter) -> None:
        snapshot, remote = self._upload(adapter.path)
        try:
            self._call("POST", "/v1/load_lora_adapter", {"lora_name": adapter.name, "lora_path": remote})
        except BaseException:
            self._delete(snapshot)
            raise
        self._uploaded[adapter.name] = snapshot  # kept while loaded: vLLM may read an evicted adapter again

    def unload_adapter(self, adapter: _Adapter) -> None:
        self._call("POST", "/v1/unload_lora_adapter", {"lora_name": adapter.name})
        self._delete(self._uploaded.pop(adapter.name))

    def close(self) -> None:
        """The server belongs to whoever started it; nothing to release here."""


class VLLMSampler:
    """Samples with vLLM from the current (LoRA-adapted) policy. Implements ``align.sampling.Sampler``.

    Args:
        model: the policy being trained, a ``PeftModel`` or a plain HF causal LM. Its base weights
            must be saved at ``model_path`` (a local directory with config, safetensors, tokenizer).
        processing_class: tokenizer (or processor) used to decode completions into ``texts``.
        mode: ``"colocate"`` runs the engine in this process; ``"server"`` talks to a server on
            ``host:port`` started by ``align serve`` (``align.sampling.vllm_server.serve``).
        sync: ``"merged"`` pushes all weights with the LoRA delta merged in; ``"adapter"`` pushes only the
            LoRA tensors as a vLLM LoRA request. Can be switched between syncs when the engine has LoRA
            enabled (``enable_lora``, by default when ``sync="adapter"``).
        sync_every: ``sync_weights()`` is called once per optimizer step; the weights are pushed on every
            ``sync_every``-th call (1: vLLM always samples from the current policy; more: cheaper, but
            samples come from a policy up to ``sync_every - 1`` steps old).
        model_path: the base checkpoint vLLM loads (colocate); defaults to ``model.name_or_path``.
        host, port: where the server listens (server mode), on this machine or another: snapshots and
            adapters are uploaded over HTTP.
        api_key: the key the server was started with (``align serve --api-key``), sent as a bearer token with
            every request; default: the ``ALIGN_VLLM_API_KEY`` environment variable. A server on another address
            than 127.0.0.1/::1/localhost has one. It travels in clear over HTTP: across an untrusted network,
            tunnel the port (SSH, a TLS proxy).
        server_timeout: seconds to wait for the server to answer ``/health`` at construction.
        request_timeout: seconds before an HTTP request to the server is abandoned.
        tensor_parallel_size: devices the colocated engine shards the model over (GPUs; the server takes
            its own, from ``align serve``).
        gpu_memory_utilization: share of device memory the colocated engine may use for weights and KV
            cache; the trainer shares the device, so the default is low. On CPU the KV cache is 1 GiB
            instead (or ``VLLM_CPU_KVCACHE_SPACE`` GiB).
        max_model_len: longest prompt + completion the colocated engine accepts (default: the model's).
        dtype: colocated engine dtype (``"auto"``: the checkpoint's; ``"float32"`` for exact parity).
        seed: engine seed, used by requests whose ``SamplingParams.seed`` is None.
        enable_lora: give the colocated engine LoRA support (default: ``sync == "adapter"``).
        enforce_eager: skip compilation and CUDA graphs (default: on CPU only).
    """

    def __init__(self, model: torch.nn.Module, processing_class, *, mode: Literal["colocate", "server"] = "colocate",
                 sync: SyncMode = "merged", sync_every: int = 1, model_path: str | None = None,
                 host: str = "127.0.0.1", port: int = 8000, server_timeout: float = 0.0,
                 request_timeout: float = 600.0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.3, max_model_len: int | None = None, dtype: str = "auto",
                 seed: int = 0, enable_lora: bool | None = None, enforce_eager: bool | None = None,
                 api_key: str | None = None):
        if sync not in ("merged", "adapter"):
            raise ValueError(f"sync must be 'merged' or 'adapter', got {sync!r}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        if enable_lora and not isinstance(model, PeftModel):
            raise ValueError("enable_lora needs a PeftModel (a LoRA policy)")
        self.model, self.sync, self.sync_every = model, sync, sync_every
        self._check_adapter_sync()
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if mode == "colocate":
            lora = sync == "adapter" if enable_lora is None else enable_lora
            self._engine = _LocalEngine(
                model_path or model.name_or_path, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, seed=seed,
                max_lora_rank=lora_rank_bucket(adapter_rank(model)) if lora else None, enforce_eager=enforce_eager)
        elif mode == "server":
            self._engine = _ServerEngine(f"http://{host}:{port}", connect_timeout=server_timeout,
                                         request_timeout=request_timeout,
                                         api_key=os.environ.get(API_KEY_ENV) if api_key is None else api_key)
        else:
            raise ValueError(f"mode must be 'colocate' or 'server', got {mode!r}")
        self._tmp = tempfile.TemporaryDirectory(prefix="align-vllm-")
        self._adapter: _Adapter | None = None
        self._run = uuid.uuid4().hex[:8]  # adapter names stay unique on a server shared across runs
        # Whether the engine's base weights may differ from the policy's: once merged weights are pushed; on a
        # server an earlier run may have pushed them; and a PiSSA/OLoRA policy's base is peft's residual, not the
        # checkpoint's. The first adapter sync therefore pushes the policy's base weights too.
        self._base_modified = True
        self.steps = 0  # sync_weights() calls, i.e. optimizer steps
        self.pushes = 0
        self.push_weights()  # the policy may arrive with a trained adapter

    def sample(self, prompt_ids: list[list[int]], params: SamplingParams) -> Completions:
        rows = [s for per_prompt in self._engine.generate(prompt_ids, params, self._adapter) for s in per_prompt]
        completion_ids = [list(ids) for ids, _ in rows]
        return Completions(prompt_ids=[list(p) for p in prompt_ids], completion_ids=completion_ids,
                           logprobs=[list(lps) for _, lps in rows],
                           texts=self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
                           n=params.n)

    def completion_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """vLLM's log-prob of each given completion token (raw model distribution: temperature 1, no
        top-k/top-p), to check the synced engine against the trained policy."""
        lps = self._engine.prompt_logprobs([p + c for p, c in zip(prompt_ids, completion_ids)], self._adapter)
        return [row[len(p) - 1:] for row, p in zip(lps, prompt_ids)]

    def sync_weights(self) -> None:
        """Call after each optimizer step; pushes the weights every ``sync_every`` steps."""
        self.steps += 1
        if self.steps % self.sync_every == 0:
            self.push_weights()

    def push_weights(self) -> None:
        """Make vLLM sample from the policy as it is now, whatever the step count."""
        self.pushes += 1
        sync_dir = os.path.join(self._tmp.name, f"sync-{self.pushes}")
        if self.sync == "merged":
            self._reload(vllm_weights(self.model, merge=True), sync_dir)
            self._base_modified = True
            self._set_adapter(None)
        else:
            self._check_adapter_sync()  # `sync` may have been switched since construction
            if self._base_modified:  # the engine gets the policy's base first (see __init__)
                self._reload(vllm_weights(self.model, merge=False), os.path.join(sync_dir, "base"))
                self._base_modified = False
            path = save_adapter_for_vllm(self.model, sync_dir)
            self._set_adapter(_Adapter(f"align-{self._run}-{self.pushes}", self.pushes, path))
        for entry in os.listdir(self._tmp.name):  # the engine reads no earlier snapshot again
            if self._adapter is None or entry != os.path.basename(sync_dir):
                shutil.rmtree(os.path.join(self._tmp.name, entry))

    def _check_adapter_sync(self) -> None:
        if self.sync == "adapter" and (problem := adapter_sync_problem(self.model)):
            raise ValueError(f"vllm_sync=adapter is not possible: {problem}; use vllm_sync=merged")

    def _reload(self, weights: Iterator[tuple[str, torch.Tensor]], sync_dir: str) -> None:
        if isinstance(self._engine, _LocalEngine) and self._engine.in_process:
            self._engine.load_weights(weights)
        else:  # another process reads the snapshot
            os.makedirs(sync_dir)
            try:
                save_file({name: t.contiguous() for name, t in weights}, os.path.join(sync_dir, "model.safetensors"))
                self._engine.load_weights_from(sync_dir)
            finally:  # read by now: a whole model's worth of disk is not kept until the next sync
                shutil.rmtree(sync_dir)

    def _set_adapter(self, adapter: _Adapter | None) -> None:
        old, self._adapter = self._adapter, adapter
        if adapter is not None:
            self._engine.load_adapter(adapter)
        if old is not None:
            self._engine.unload_adapter(old)

    def close(self) -> None:
        """Shut down a colocated engine and delete the weight snapshots."""
        self._engine.close()
        self._tmp.cleanup()

    def __enter__(self) -> VLLMSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

