"""Which transformer layers each pipeline stage holds: Megatron-Core's split.

Layers are cut into contiguous ranges, evenly by default. Megatron-LM's
`--decoder-first-pipeline-num-layers` / `--decoder-last-pipeline-num-layers`
(`num_layers_in_first_pipeline_stage` / `num_layers_in_last_pipeline_stage` in
`TransformerConfig`) fix the first or last stage's count, and the stages between share the rest
evenly. Training uses an uneven first or last stage to balance the embedding and the output
layer; checkpoints saved that way number each stage's layers from 0, so converting them needs
the same ranges.
"""

from __future__ import annotations


def pipeline_layer_ranges(
    num_layers: int, pipeline_size: int, first: int | None = None, last: int | None = None
) -> list[range]:
    """The global layer indices of each stage, in stage order; ValueError naming the numbers
    when they do not split."""
    if pipeline_size < 1:
        raise ValueError(f"pipeline_model_parallel_size={pipeline_size} must be >= 1")
    if pipeline_size == 1:
        if first not in (None, num_layers) or last not in (None, num_layers):
            raise ValueError("an uneven first or last pipeline stage needs pipeline_model_parallel_size > 1")
        return [range(num_layers)]
    middle_layers, middle_stages = num_layers, pipeline_size
    for name, count in (("first", first), ("last", last)):
        if count is not None:
            if count < 1:
                raise ValueError(f"num_layers_in_{name}_pipeline_stage={count} must be >= 1")
            middle_layers -= count
            middle_stages -= 1
    if middle_stages == 0:
        if middle_layers != 0:
            raise ValueError(
                f"num_layers_in_first_pipeline_stage={first} + num_layers_in_last_pipeline_stage={last} "
                f"must equal num_layers={num_layers} at pipeline_model_parallel_size={pipeline_size}"
            )
        per_stage = 0
    elif middle_layers < middle_stages or middle_layers % middle_stages:
        uneven = "" if first is None and last is None else (
            f" (after num_layers_in_first_pipeline_stage={first}, num_layers_in_last_pipeline_stage={last})")
        raise ValueError(
            f"num_layers={num_layers}{uneven} does not split evenly into {middle_stages} pipeline stages; "
            f"choose a pipeline_model_parallel_size that divides it"
        )
    else:
        per_stage = middle_layers // middle_stages
    counts = [per_stage] * pipeline_size
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges
