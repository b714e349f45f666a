"""Legacy Megatron-LM checkpoints: `mp_rank_XX/model_optim_rng.pt`, one pickle per TP rank (per TP
rank and pipeline stage, `mp_rank_XX_YYY`, with pipeline parallelism), merged.

The layout is GPT2-345M's (Megatron-LM's `legacy` model, checkpoint_version 0 to 3.0):

    {"model": {"language_model": {
        "embedding": {"word_embeddings": {"weight": [V/p, h]}, "position_embeddings": {"weight": [s, h]}},
        "transformer" (or "encoder"): {
            "layers.N.input_layernorm.weight", "layers.N.self_attention.query_key_value.weight" [3h/p, h],
            "layers.N.self_attention.dense.weight" [h, h/p], "layers.N.post_attention_layernorm.weight",
            "layers.N.mlp.dense_h_to_4h.weight" [f/p, h], "layers.N.mlp.dense_4h_to_h.weight" [h, f/p],
            (+ .bias of each), "final_layernorm.weight", ...},
        "output_layer": {"weight": [V/p, h]}}},          # only with untied embeddings
     "args": Namespace(...), "checkpoint_version": 3.0, "iteration": N, "rng_state": [...], ...}

Each rank holds a contiguous block of every split tensor (rows of column-parallel weights,
columns of row-parallel ones), so merging is concatenation, except for two layouts:

- query_key_value: from checkpoint_version 2.0 on, a rank's rows are [heads_r, 3, d] (per head: q, k,
  v), or per query group [groups_r, n/g + 2, d] with GQA; concatenated over ranks that is exactly
  Megatron-Core's per-group layout. Older versions are reordered to it first (version 0: [3,
  heads_r, d]; version 1.0: [heads_r, d, 3]).
- a swiglu dense_h_to_4h holds [gate_r; up_r] on rank r; merged to all gates, then all ups.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tpserve.model.builder import GPTModelConfig
from tpserve.model.checkpoint.format import CheckpointError
from tpserve.model.checkpoint.pickle_files import load_pickle
from tpserve.model.pipeline_split import pipeline_layer_ranges

_FILE_NAMES = ("model_optim_rng.pt", "model_rng.pt")
# Legacy layer names -> Megatron-Core names; how each is split across ranks (dim, or None).
_LAYER = {
    "input_layernorm": ("input_layernorm", None),
    "self_attention.query_key_value": ("self_attention.linear_qkv", 0),
    "attention.query_key_value": ("self_attention.linear_qkv", 0),
    "self_attention.dense": ("self_attention.linear_proj", 1),
    "attention.dense": ("self_attention.linear_proj", 1),
    "post_attention_layernorm": ("pre_mlp_layernorm", None),
    "mlp.dense_h_to_4h": ("mlp.linear_fc1", 0),
    "mlp.dense_4h_to_h": ("mlp.linear_fc2", 1),
}


_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def resolve_iteration(folder: Path) -> Path:
    """A Megatron-LM save folder names its latest iteration in latest_checkpointed_iteration.txt."""
    tracker = folder / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        return folder
    text = tracker.read_text().strip()
    sub = folder / ("release" if text == "release" else f"iter_{int(text):07d}")
    if not sub.is_dir():
        raise CheckpointError(f"{tracker} names iteration {text!r} but {sub} is missing")
    return sub


def is_legacy(folder: Path) -> bool:
    return (folder / "mp_rank_00").is_dir() or (folder / "mp_rank_00_000").is_dir()


def _load_rank_file(sub: Path, allow_pickle: bool) -> dict[str, Any]:
    file = next((sub / n for n in _FILE_NAMES if (sub / n).is_file()), None)
    if file is None:
        raise CheckpointError(f"{sub}: none of {list(_FILE_NAMES)} is there")
    state = load_pickle(file, allow_pickle)
    if "model" not in state and "model0" in state:
        raise CheckpointError(
            f"{file}: saved with a virtual pipeline (model0, model1, ...), which tpserve does not convert; "
            f"re-save without --num-layers-per-virtual-pipeline-stage"
        )
    return state


def read_rank_files(folder: Path, allow_pickle: bool) -> list[dict[str, Any]]:
    """Every TP rank's state dict, in rank order (memory-mapped); a pipeline-parallel save's
    stages (mp_rank_XX_YYY) joined into one state dict per TP rank."""
    names = {p.name for p in folder.iterdir() if p.is_dir()}
    pp = sum(1 for n in names if re.fullmatch(r"mp_rank_00_\d{3}", n)) or None
    tp = sum(1 for n in names if re.fullmatch(r"mp_rank_\d{2}" + (r"_000" if pp else ""), n))
    states = []
    for rank in range(tp):
        subs = [folder / f"mp_rank_{rank:02d}"] if pp is None else [
            folder / f"mp_rank_{rank:02d}_{stage:03d}" for stage in range(pp)]
        missing = [s.name for s in subs if s.name not in names]
        if missing:
            raise CheckpointError(f"{folder}: {', '.join(missing)} missing (found {sorted(names)})")
        stages = [_load_rank_file(sub, allow_pickle) for sub in subs]
        states.append(stages[0] if pp is None else _join_stages(stages, subs))
    args = states[0].get("args") if states else None
    for name, found in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp or 1)):
        said = getattr(args, name, None) if args is not None else None
        if said is not None and said != found:
            raise CheckpointError(f"{folder}: the args say {name}={said} but the folders say {found}")
    return states


def _join_stages(stages: list[dict], subs: list[Path]) -> dict[str, Any]:
    """One TP rank's pipeline stages as one state dict. Each stage numbers its layers from 0, so
    stage p's are offset by the layer counts of the stages before it (Megatron's split, uneven
    first or last stage included); the embedding comes from the first stage, the final norm and
    output layer from the last. The last stage's `word_embeddings_for_head` is its copy of the
    tied embedding, equal to the first stage's, so it is not needed."""
    transformers = []
    for state, sub in zip(stages, subs):
        lm = state.get("model", {}).get("language_model")
        transformer = None if lm is None else lm.get("transformer", lm.get("encoder"))
        if transformer is None:
            raise CheckpointError(f"{sub}: no model.language_model.encoder (not a Megatron-LM GPT checkpoint?)")
        transformers.append(transformer)
    counts = [len({m.group(1) for k in t if (m := _LAYER_KEY.match(k))}) for t in transformers]
    args = stages[0].get("args")
    if args is not None and getattr(args, "num_layers", None) is not None:
        try:
            expected = [len(r) for r in pipeline_layer_ranges(
                args.num_layers, len(stages), getattr(args, "decoder_first_pipeline_num_layers", None),
                getattr(args, "decoder_last_pipeline_num_layers", None))]
        except ValueError as e:
            raise CheckpointError(f"{subs[0].parent}: {e}") from None
        if counts != expected:
            raise CheckpointError(
                f"{subs[0].parent}: the stages hold {counts} layers but num_layers={args.num_layers} "
                f"splits into {expected} over {len(stages)} pipeline stages"
            )
    joined: dict[str, Any] = {}
    offset = 0
    for transformer, count in zip(transformers, counts):
        for key, value in transformer.items():
            m = _LAYER_KEY.match(key)
            joined[f"layers.{int(m.group(1)) + offset}.{m.group(2)}" if m else key] = value
        offset += count
    first, last = stages[0]["model"]["language_model"], stages[-1]["model"]["language_model"]
    language_model = {"encoder": joined}
    if "embedding" in first:
        language_model["embedding"] = first["embedding"]
    if "output_layer" in last:
        language_model["output_layer"] = last["output_layer"]
    return {k: v for k, v in stages[0].items() if k != "model"} | {"model": {"language_model": language_model}}


def _language_model(state: dict, where: Path) -> tuple[dict, dict, dict | None]:
    try:
        lm = state["model"]["language_model"]
        embedding = lm["embedding"]
    except KeyError as e:
        raise CheckpointError(f"{where}: no model.language_model.{e.args[0]} (not a Megatron-LM GPT checkpoint?)") from None
    transformer = lm.get("transformer", lm.get("encoder"))
    if transformer is None:
        raise CheckpointError(f"{where}: model.language_model has neither 'transformer' nor 'encoder'")
    return embedding, transformer, lm.get("output_layer")


def _qkv_per_group(t: torch.Tensor, version: float, config: GPTModelConfig, tp: int) -> torch.Tensor:
    """One rank's query_key_value rows in Megatron-Core's per-group order [g_r, n/g + 2, d]."""
    c = config.transformer
    heads, d, rest = c.num_attention_heads // tp, c.kv_channels, t.shape[1:]
    if version >= 2.0 or c.num_query_groups != c.num_attention_heads:
        return t  # already per group (GQA only exists in versions >= 3.0)
    if version == 1.0:
        t = t.reshape(heads, d, 3, *rest).transpose(1, 2)  # (heads, d, 3) -> (heads, 3, d)
    else:
        t = t.reshape(3, heads, d, *rest).transpose(0, 1)  # (3, heads, d) -> (heads, 3, d)
    return t.reshape(-1, *rest)


def merge_legacy(states: list[dict], config: GPTModelConfig, where: Path) -> dict[str, torch.Tensor]:
    """Full tensors under Megatron-Core names, merged from the TP ranks' state dicts."""
    tp = len(states)
    version = float(states[0].get("checkpoint_version", 0.0))
    parts = [_language_model(s, where) for s in states]
    embeddings = [p[0] for p in parts]
    layers = [p[1] for p in parts]

    out = {"embedding.word_embeddings.weight": torch.cat([e["word_embeddings"]["weight"] for e in embeddings])}
    if config.position_embedding_type == "learned_absolute":
        out["embedding.position_embeddings.weight"] = embeddings[0]["position_embeddings"]["weight"]
    if not config.share_embeddings_and_output_weights:
        if parts[0][2] is None:
            raise CheckpointError(f"{where}: untied embeddings but model.language_model.output_layer is missing")
        out["output_layer.weight"] = torch.cat([p[2]["weight"] for p in parts])

    for key in layers[0]:
        if "_extra_state" in key:
            continue
        name, _, kind = key.rpartition(".")  # "layers.3.mlp.dense_h_to_4h", "weight"
        if name in ("final_layernorm", "final_norm"):
            out[f"decoder.final_layernorm.{kind}"] = layers[0][key]
            continue
        match = _LAYER_KEY.fullmatch(name)
        if match is None or match.group(2) not in _LAYER:
            raise CheckpointError(f"{where}: tensor {key!r} is not part of a Megatron-LM GPT layer")
        prefix, op = match.groups()  # "3", "mlp.dense_h_to_4h"
        target, dim = _LAYER[op]
        pieces = [layer[key] for layer in layers]
        if op.endswith("query_key_value"):
            pieces = [_qkv_per_group(p, version, config, tp) for p in pieces]
        if op == "mlp.dense_h_to_4h" and config.transformer.gated_linear_unit:
            halves = [p.chunk(2) for p in pieces]  # [gate_r; up_r] per rank
            pieces = [h[0] for h in halves] + [h[1] for h in halves]
        if dim is None or (kind == "bias" and dim == 1):
            merged = pieces[0]  # replicated: norms, and row-parallel biases (added after the all-reduce)
        else:
            merged = torch.cat(pieces, dim=dim)
        out[f"decoder.layers.{prefix}.{target}.{kind}"] = merged
    return out
