"""PUT /api: Megatron-LM's text generation server (megatron/text_generation_server.py), so a
Megatron user's client (tools/text_generation_cli.py and the like) works unchanged.

Request fields and their checks are Megatron's, with its messages: prompts (1 to 128 strings),
tokens_to_generate (default 64; 0 scores the prompts and needs logprobs), logprobs, temperature
in (0, 100], top_k in [0, 1000] (1 is greedy), top_p a float in [0, 1] (0 = off; not with top_k),
add_BOS, stop_on_eol, stop_on_double_eol, random_seed, no_log. Beam search (beam_width) and
top_p_decay/top_p_bound/prevent_newline_after_colon are refused by name, not ignored.

The answer is Megatron's: `text` (each prompt followed by its generation, decoded from the
tokens), `segments` (each token's text), `logprobs` (each token's log-probability after the
first, prompt and generation; null unless asked) and `tokens` (the ids, as Megatron-Core's engine
adds). Generation stops at the end-of-text token, which stays in the tokens, as in Megatron.
Errors are 400 with `{"message": ...}` (Megatron's CLI reads `message`); Megatron answers some
of them with status 200, which we do not copy.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tpserve.engine.sampling_params import SamplingParams
from tpserve.server.errors import APIError
from tpserve.server.openai_api import finite, runner_of
from tpserve.server.protocol import MegatronRequest

router = APIRouter()

MAX_PROMPTS = 128
UNSUPPORTED = {
    "beam_width": "beam search (beam_width) is not supported by tpserve",
    "top_p_decay": "top_p_decay is not supported by tpserve",
    "top_p_bound": "top_p_bound is not supported by tpserve",
    "prevent_newline_after_colon": "prevent_newline_after_colon is not supported by tpserve",
}


class MegatronError(Exception):
    pass


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise MegatronError(f"{name} must be a boolean value")
    return value


def parse(body: object) -> dict:
    """Megatron's checks, in its order and words."""
    if not isinstance(body, dict):
        raise MegatronError("the request body must be a JSON object")
    if "prompts" not in body:
        raise MegatronError("prompts argument required")
    if "max_len" in body:
        raise MegatronError("max_len is no longer used.  Replace with tokens_to_generate")
    if "sentences" in body:
        raise MegatronError("sentences is no longer used.  Replace with prompts")
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise MegatronError("prompts is not a list of strings")
    if len(prompts) == 0:
        raise MegatronError("prompts is empty")
    if len(prompts) > MAX_PROMPTS:
        raise MegatronError("Maximum number of prompts is 128")
    tokens_to_generate = body.get("tokens_to_generate", 64)
    if not _is_int(tokens_to_generate):
        raise MegatronError("tokens_to_generate must be an integer greater than 0")
    if tokens_to_generate < 0:
        raise MegatronError("tokens_to_generate must be an integer greater than or equal to 0")
    logprobs = _bool(body, "logprobs")
    if tokens_to_generate == 0 and not logprobs:
        raise MegatronError("tokens_to_generate=0 implies logprobs should be True")
    temperature = body.get("temperature", 1.0)
    if not (_is_int(temperature) or isinstance(temperature, float)) or not 0.0 < temperature <= 100.0:
        raise MegatronError("temperature must be a positive number less than or equal to 100.0")
    top_k = body.get("top_k", 0)
    if not _is_int(top_k) or not 0 <= top_k <= 1000:
        raise MegatronError("top_k must be an integer equal to or greater than 0 and less than or equal to 1000")
    top_p = body.get("top_p", 0.0)
    if not isinstance(top_p, float):
        raise MegatronError("top_p must be a positive float less than or equal to 1.0")
    if top_p > 0.0 and top_k > 0:
        raise MegatronError("cannot set both top-k and top-p samplings.")
    if not 0.0 <= top_p <= 1.0:
        raise MegatronError("top_p must be less than or equal to 1.0")
    for name, message in UNSUPPORTED.items():
        if body.get(name) not in (None, False, 0, 0.0):
            raise MegatronError(message)
    add_bos = _bool(body, "add_BOS")
    if any(len(p) == 0 for p in prompts) and not add_bos:
        raise MegatronError("Empty prompts require add_BOS=true")
    stop_on_double_eol = _bool(body, "stop_on_double_eol")
    stop_on_eol = _bool(body, "stop_on_eol")
    random_seed = body.get("random_seed", -1)
    if not _is_int(random_seed):
        raise MegatronError("random_seed must be integer")
    if random_seed < -1:
        raise MegatronError("random_seed must be a positive integer")
    _bool(body, "no_log")
    return dict(prompts=prompts, tokens_to_generate=tokens_to_generate, logprobs=logprobs, temperature=temperature,
                top_k=top_k, top_p=top_p, add_bos=add_bos, stop_on_eol=stop_on_eol,
                stop_on_double_eol=stop_on_double_eol, random_seed=random_seed)


def _error(message: str, status: int = 400, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status, headers=headers)


@router.put("/api", openapi_extra={"requestBody": {
    "required": True, "content": {"application/json": {"schema": MegatronRequest.model_json_schema()}}}})
async def megatron_generate(request: Request):
    runner = runner_of(request)
    try:
        runner.check_available()
        body = parse(json.loads(await request.body()))
    except json.JSONDecodeError as e:
        return _error(f"the request body is not valid JSON: {e}")
    except MegatronError as e:
        return _error(str(e))
    except APIError as e:
        return _error(e.message, e.status, e.headers)

    max_model_len = runner.client.max_model_len
    tokenizer = runner.client.tokenizer
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prompt_ids, params = [], []
    generate = max(body["tokens_to_generate"], 1)  # 0 scores: one token is sampled and dropped
    stop = ["\n\n"] if body["stop_on_double_eol"] else ["\n"] if body["stop_on_eol"] else None
    for i, prompt in enumerate(body["prompts"]):
        ids = ([bos] if body["add_bos"] else []) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) + generate > max_model_len:
            return _error(f"Length of prompt + tokens_to_generate longer than allowed: prompt {i} has {len(ids)} "
                          f"tokens, plus {body['tokens_to_generate']} to generate, and the model's length is "
                          f"{max_model_len}")
        prompt_ids.append(ids)
        top_k, top_p = body["top_k"], body["top_p"] or 1.0
        params.append(SamplingParams(
            temperature=0.0 if top_k == 1 else float(body["temperature"]), top_k=top_k, top_p=top_p,
            max_tokens=generate, seed=None if body["random_seed"] < 0 else body["random_seed"] + i,
            stop=stop, include_stop_str_in_output=True, skip_special_tokens=False,
            logprobs=0 if body["logprobs"] else None, prompt_logprobs=0 if body["logprobs"] else None,
        ))
    try:
        outs = await runner.final(request.state.request_id, prompt_ids, params, request.is_disconnected)
    except APIError as e:
        return _error(e.message, e.status, e.headers)

    scoring = body["tokens_to_generate"] == 0
    texts, segments, logprobs, tokens = [], [], [], []
    for out in outs:
        o = out.outputs[0]
        generated = [] if scoring else o.token_ids
        ids = out.prompt_token_ids + generated
        tokens.append(ids)
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
        segments.append([tokenizer.decode([t], skip_special_tokens=False) for t in ids])
        if body["logprobs"]:
            prompt_lp = [finite(e.logprob) for e in (out.prompt_logprobs or [])[1:]]
            output_lp = [] if scoring else [finite(e.logprob) for e in (o.logprobs or [])]
            logprobs.append(prompt_lp + output_lp)
    return {"text": texts, "segments": segments, "logprobs": logprobs if body["logprobs"] else None, "tokens": tokens}
