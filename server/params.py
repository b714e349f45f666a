"""From a request body to what the engine takes: prompt token ids and `SamplingParams`.

Length policy (documented in the README): a request whose prompt plus max_tokens exceeds the
model's length (`--max-model-len`) is refused with 400 and both counts, never silently clamped,
so a client learns at once that it asked for more than it can get. Where max_tokens is left
out, /v1/completions and /generate use 16 (OpenAI's default); /v1/chat/completions uses what
the prompt leaves of the model's length.
"""

from __future__ import annotations

from tpserve.engine.client import EngineClient
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.structured_outputs import StructuredOutputsParams
from tpserve.server.errors import bad_request
from tpserve.server.protocol import SamplingFields

# Fields of SamplingFields handed to SamplingParams as they are, when set.
_PASSED = (
    "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "seed", "stop", "stop_token_ids", "min_tokens", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
)


def tokenize(client: EngineClient, prompt: str | list[int], param: str = "prompt") -> list[int]:
    """Token ids of a prompt (text through the checkpoint's tokenizer); 400 when it is empty, has
    ids outside the vocabulary, or leaves no room to generate (the message gives the counts)."""
    try:
        return client.tokenize(prompt)
    except ValueError as e:
        raise bad_request(str(e), param=param) from None


def resolve_max_tokens(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """max_tokens to run with: the one asked for, checked against the model's length, or (None)
    all that is left of it."""
    room = max_model_len - num_prompt_tokens
    if max_tokens is None:
        if room < 1:
            raise bad_request(
                f"the prompt has {num_prompt_tokens} tokens, and this model's maximum context length is "
                f"{max_model_len}: no room is left to generate", param="messages")
        return room
    if num_prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} for the "
            f"completion). Please reduce the prompt or max_tokens.", param="max_tokens")
    return max_tokens


def sampling_params(
    body: SamplingFields, max_tokens: int, client: EngineClient,
    logprobs: int | None = None, prompt_logprobs: int | None = None,
) -> SamplingParams:
    """SamplingParams for a request, checked by the engine's client (the only check it gets);
    every value refused becomes a 400 with its message."""
    kwargs = {name: getattr(body, name) for name in _PASSED if getattr(body, name) is not None}
    if body.logit_bias:
        kwargs["logit_bias"] = body.logit_bias
    if body.n > client.max_num_seqs:  # named as the flag a server's operator sets
        raise bad_request(f"n={body.n} exceeds the server's --max-num-seqs={client.max_num_seqs}", param="n")
    constraint = structured_outputs(body)
    try:
        params = SamplingParams(
            **kwargs, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            structured_outputs=constraint,
        )
        client.check_params(params)
    except ValueError as e:
        raise bad_request(str(e)) from None
    return params


def constraint_param(body: SamplingFields) -> str:
    """The request field a structured-output error names."""
    return "response_format" if body.response_format is not None else "structured_outputs"


def structured_outputs(body: SamplingFields) -> StructuredOutputsParams | None:
    """The request's output constraint: OpenAI's response_format or vLLM's structured_outputs
    (one of them; response_format "text" is none). Checked for shape here, compiled later."""
    fmt, extra = body.response_format, body.structured_outputs
    if fmt is not None and fmt.type != "text" and extra is not None:
        raise bad_request("give response_format or structured_outputs, not both", param="structured_outputs")
    try:
        if extra is not None:
            return StructuredOutputsParams(json=extra.json_, json_object=bool(extra.json_object), regex=extra.regex,
                                           choice=extra.choice, grammar=extra.grammar)
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request('response_format type "json_schema" needs json_schema: {"name": ..., "schema": {...}}',
                              param="response_format")
        return StructuredOutputsParams(json=fmt.json_schema.schema_)
    except ValueError as e:
        raise bad_request(str(e), param=constraint_param(body)) from None


async def compile_structured_outputs(client: EngineClient, body: SamplingFields, params: list[SamplingParams]) -> None:
    """400 naming the problem when a constraint cannot be compiled (a bad schema, regex or
    grammar, or one over the compiler's time limit). Awaited off the event loop's thread; the
    compiled grammar is cached for the engine."""
    for p in params:
        if p.structured_outputs is not None:
            try:
                await client.check_structured_outputs(p)
            except ValueError as e:
                raise bad_request(str(e), param=constraint_param(body)) from None
            return  # every prompt of a request has the same constraint
