"""Request bodies, checked by pydantic: the OpenAI ones, and our `/generate`.

Field names and ranges follow OpenAI's API; the engine's extra sampling parameters use vLLM's
names (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, ...), so clients
written for vLLM send them unchanged (the openai SDK through `extra_body`). Unknown fields are
refused (400 "unrecognized request argument"), as OpenAI does: a misspelt `max_token` must not
be ignored silently. Ranges here give the first, precise error; `SamplingParams` checks again.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tpserve.engine.sampling_params import MAX_LOGIT_BIAS, MAX_LOGPROBS

# Above any context length we serve; a larger value is refused by pydantic before it is looked at.
MAX_TOKENS_LIMIT = 1 << 24
MAX_N = 128

TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]
Seed = Annotated[int, Field(ge=-(1 << 63), lt=1 << 63)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema: the schema the output must follow, and its name."""

    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the output always follows the schema, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text (no constraint), any JSON object, or a JSON Schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs` extra field: exactly one constraint (engine/structured_outputs.py)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON Schema")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="a Lark (llguidance) or GBNF grammar")


class SamplingFields(Strict):
    """What every generation route accepts. None means "the default" (as in SamplingParams)."""

    n: int = Field(1, ge=1, le=MAX_N, description="samples per prompt")
    temperature: float | None = Field(None, ge=0.0, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling mass, in (0, 1]")
    top_k: int | None = Field(None, ge=-1, description="keep the k most likely tokens; 0 or -1 = off")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = Field(
        None, description="token id (as a string) -> bias added to its logit, in [-100, 100]"
    )
    seed: Seed | None = None
    stop: str | list[str] | None = Field(None, description="up to any number of stop strings")
    stop_token_ids: list[TokenId] | None = None
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_LIMIT)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Structured outputs: OpenAI's response_format, or vLLM's structured_outputs (not both).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class CompletionRequest(SamplingFields):
    """POST /v1/completions. max_tokens defaults to 16, as OpenAI's; 0 with echo scores the prompt."""

    model: str | None = None
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS_LIMIT)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None
    user: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """image_url, input_audio, ...: accepted by the schema, refused with a clear message."""

    model_config = ConfigDict(extra="allow")
    type: str


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # a JSON object's text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    # Extra keys are kept: a chat template may use them.
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, sent back with their results
    tool_call_id: str | None = None  # a tool result: the call it answers


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments object
    strict: bool | None = None


class ChatTool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions. max_tokens defaults to what is left of the model's length."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class GenerateRequest(SamplingFields):
    """POST /generate: one prompt (text or token ids), every engine parameter."""

    prompt: str | list[TokenId]
    stream: bool = False
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_LIMIT, description="None: up to the model's length")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class MegatronRequest(BaseModel):
    """PUT /api, Megatron-LM's text generation server. Documentation only: the route checks the
    body itself, field by field, with Megatron's own messages."""

    prompts: list[str] = Field(min_length=1, max_length=128)
    tokens_to_generate: int = Field(64, ge=0)
    logprobs: bool = False
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    top_k: int = Field(0, ge=0, le=1000)
    top_p: float = Field(0.0, ge=0.0, le=1.0)
    add_BOS: bool = False
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False
    random_seed: int = Field(-1, ge=-1)
    no_log: bool = False
