"""Reference log-probs of a whole offline dataset, computed once and cached on disk (``precompute_ref_logps``).

The reference policy is the base model (the adapter disabled) or a frozen adapter, which training never changes: its sequence
log-probs of every (prompt, completion) can be computed in one no-grad pass before training, and every
later step skips its reference forward. The result is cached under ``$ALIGN_CACHE/ref_logps`` (default
``~/.cache/align``), keyed by a fingerprint of the base model (its config, where it was loaded from, and the
size and mtime of its weight files, or its hub commit), the tokenized data and the log-prob settings: a
second run, another epoch count or a hyper-parameter sweep on the same data and model reuses it. Delete the
directory to force a recomputation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from align.cache import cache_dir
from align.data import GroupCollator, padded_length
from align.models import reference_completion_logps, reference_snapshot, sequence_logps

logger = logging.getLogger(__name__)

RULE = "align-ref-logps-1"  # bump when the log-prob computation changes: old caches are then not reused


def base_model_identity(model: torch.nn.Module) -> dict:
    """What the reference log-probs depend on besides the data: the base model's config and weights' origin."""
    config = model.config
    origin = config._name_or_path
    weights = []
    if os.path.isdir(origin):
        for path in sorted(Path(origin).iterdir()):
            if path.suffix in (".safetensors", ".bin"):
                stat = path.stat()
                weights.append([path.name, stat.st_size, stat.st_mtime_ns])
    snapshot = reference_snapshot(model)  # a frozen reference adapter (adapter_path)
    adapter = None if snapshot is None else hashlib.sha256(
        b"".join(snapshot[k].float().cpu().numpy().tobytes() for k in sorted(snapshot))).hexdigest()
    return {"config": config.to_json_string(use_diff=False), "origin": os.path.realpath(origin) if weights else origin,
            "weights": weights, "commit": getattr(config, "_commit_hash", None),
            "dtype": str(next(model.parameters()).dtype), "reference_adapter": adapter}


def fingerprint(model: torch.nn.Module, dataset, length_normalize: bool) -> str:
    digest = hashlib.sha256(json.dumps([RULE, base_model_identity(model), length_normalize], sort_keys=True).encode())
    for i in range(len(dataset)):
        ex = dataset[i]
        digest.update(json.dumps([ex["prompt_ids"], ex["completion_ids"]]).encode())
    return digest.hexdigest()[:32]


@torch.no_grad()
def compute_reference_logps(model: torch.nn.Module, dataset, pad_token_id: int, *, batch_size: int,
                            length_normalize: bool, layout: str = "padded") -> torch.Tensor:
    """(N, K) reference sequence log-probs of every example's completions, in batches of similar lengths run in
    ``layout`` (``align.hf_utils.forward_rows``)."""
    collate = GroupCollator(pad_token_id)
    order = sorted(range(len(dataset)), key=lambda i: padded_length(dataset[i]))
    device = next(model.parameters()).device
    out = None
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = collate([dataset[i] for i in index])
        forward = {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "completion_mask")}
        token = reference_completion_logps(model, **forward, layout=layout, group_size=batch["group_size"])
        seq = sequence_logps(token, forward["completion_mask"], length_normalize=length_normalize)
        seq = seq.view(len(index), batch["group_size"]).float().cpu()
        if out is None:
            out = torch.empty(len(dataset), batch["group_size"])
        out[index] = seq
    return out


def cached_reference_logps(model: torch.nn.Module, dataset, pad_token_id: int, *, batch_size: int,
                           length_normalize: bool, layout: str = "padded") -> torch.Tensor:
    """``compute_reference_logps`` through the on-disk cache (written atomically: a crash leaves no partial
    file). Under several processes, call it inside ``accelerator.main_process_first()``: rank 0 computes
    and writes, the others then read."""
    path = cache_dir() / "ref_logps" / f"{fingerprint(model, dataset, length_normalize)}.safetensors"
    if path.exists():
        logps = load_file(path)["ref_logps"]
        if logps.shape[0] == len(dataset):
            logger.info("reference log-probs read from %s", path)
            return logps
    logps = compute_reference_logps(model, dataset, pad_token_id, batch_size=batch_size,
                                    length_normalize=length_normalize, layout=layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file({"ref_logps": logps.contiguous()}, tmp)
    os.replace(tmp, path)
    logger.info("reference log-probs of %d examples written to %s", len(dataset), path)
    return logps
