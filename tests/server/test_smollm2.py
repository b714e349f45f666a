"""The real default model: `tpserve serve` with no --checkpoint (what `make serve` runs) converts
SmolLM2-135M-Instruct on first start, and its chat template and tokenizer give, through the
openai SDK, the LLM API's greedy text."""

from __future__ import annotations

import openai
import pytest
from helpers import ENGINE_PINS

from tpserve import SamplingParams

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg_cache")


@pytest.fixture(scope="module")
def smollm2_server(start_server, cache):
    # A fresh cache: the server converts the default model itself, as on a user's first `make serve`.
    return start_server("--max-model-len", "512", "--kv-cache-memory", "64MB", "--served-model-name",
                        "smollm2", checkpoint=None, env={"XDG_CACHE_HOME": str(cache)})


def test_default_model_chat_and_completions_equal_the_llm_api(smollm2_server, cache):
    from tpserve import LLM
    from tpserve.model.checkpoint import prepare_default_model

    client = openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    chat = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=24, temperature=0)
    completion_chunks = list(client.completions.create(model="smollm2", prompt="The capital of France is",
                                                       max_tokens=16, temperature=0, stream=True))
    with LLM(prepare_default_model(cache / "tpserve"), max_model_len=512, kv_cache_memory=64 << 20,
             **ENGINE_PINS) as llm:
        tokenizer = llm.get_tokenizer()
        text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        want_chat = llm.generate(ids, SamplingParams(temperature=0, max_tokens=24))[0]
        want_completion = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=16))[0]
    assert chat.choices[0].message.content == want_chat.outputs[0].text
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.prompt_tokens == len(ids)
    streamed = "".join(c.choices[0].text for c in completion_chunks)
    assert streamed == want_completion.outputs[0].text
