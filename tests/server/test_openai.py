"""The official openai SDK, unmodified, against `tpserve serve`: completions and chat, streamed and
not, with the text the `LLM` API gives for the same greedy request."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tpserve import SamplingParams

PROMPTS = ["The quick brown fox", "def add(a, b):", "Once upon a time there"]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def greedy(reference, prompt, max_tokens, **kwargs):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)
    return reference.generate(prompt, params)[0]


def chat_ids(reference, messages):
    tokenizer = reference.get_tokenizer()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_completions_equal_the_llm_api(client, reference):
    for prompt in PROMPTS:
        want = greedy(reference, prompt, 12)
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want.outputs[0].text
        assert got.choices[0].finish_reason == want.outputs[0].finish_reason
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
        assert got.model == "tiny" and got.object == "text_completion"


def test_completions_stream_as_openai_sends_it(client, reference):
    want = greedy(reference, PROMPTS[0], 12).outputs[0]
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    *text_chunks, usage_chunk = chunks
    assert len(text_chunks) > 1  # streamed, not one blob
    assert "".join(c.choices[0].text for c in text_chunks) == want.text
    assert [c.choices[0].finish_reason for c in text_chunks[:-1]] == [None] * (len(text_chunks) - 1)
    assert text_chunks[-1].choices[0].finish_reason == want.finish_reason
    assert all(c.usage is None for c in text_chunks)
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == len(want.token_ids)


def test_token_id_prompts_and_batches(client, reference):
    tokenizer = reference.get_tokenizer()
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    got = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert [c.index for c in got.choices] == [0, 1, 2]
    for choice, prompt in zip(got.choices, PROMPTS):
        assert choice.text == greedy(reference, prompt, 6).outputs[0].text
    assert got.usage.prompt_tokens == sum(map(len, ids))


def test_chat_equals_the_llm_api(client, reference):
    want = greedy(reference, chat_ids(reference, MESSAGES), 10)
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)


def test_chat_stream_as_openai_sends_it(client, reference):
    want = greedy(reference, chat_ids(reference, MESSAGES), 10).outputs[0]
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    first, *middle, last, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in middle) == want.text
    assert all(c.choices[0].finish_reason is None for c in [first, *middle])
    assert last.choices[0].finish_reason == want.finish_reason and last.choices[0].delta.content is None
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == len(want.token_ids)
    assert all(c.object == "chat.completion.chunk" and c.id == first.id for c in chunks)


def test_raw_stream_lines_end_with_done(server):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(line[6:]) for line in lines[:-1])  # not asked for


def test_logprobs(client, reference):
    want = greedy(reference, PROMPTS[1], 5, logprobs=2).outputs[0]
    got = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=5, temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.token_logprobs == pytest.approx([e.logprob for e in want.logprobs], abs=1e-4)
    # The top 2 and the chosen token, keyed by text: two byte tokens that both decode to U+FFFD share a key.
    assert all(1 <= len(top) <= 3 and top[token] == lp_ for top, token, lp_ in
               zip(lp.top_logprobs, lp.tokens, lp.token_logprobs) if "\ufffd" not in token)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(item.top_logprobs) == 3 and item.logprob <= 0 for item in content)


def test_echo_with_max_tokens_0_scores_the_prompt(client, reference):
    """What lm-eval-harness sends for log-likelihoods: a batch, echo, max_tokens 0, logprobs 1."""
    want = [greedy(reference, p, 1, prompt_logprobs=1) for p in PROMPTS[:2]]
    got = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=0, echo=True, logprobs=1,
                                    temperature=0)
    for choice, prompt, ref in zip(got.choices, PROMPTS, want):
        assert choice.text == prompt
        lp = choice.logprobs
        assert len(lp.tokens) == len(ref.prompt_token_ids) and lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx([e.logprob for e in ref.prompt_logprobs[1:]], abs=1e-4)
        assert "".join(lp.tokens) == prompt
    assert got.usage.completion_tokens == 0


def test_echo_prepends_the_prompt(client):
    got = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert got.choices[0].text == PROMPTS[0] + plain.choices[0].text


def test_cached_tokens_are_reported(client):
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # several full 16-token blocks
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16
    assert again.choices[0].text == first.choices[0].text


def test_engine_parameters_through_extra_body(client):
    seeded = dict(model="tiny", prompt=PROMPTS[2], max_tokens=8, temperature=1.0, seed=7,
                  extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.2})
    assert client.completions.create(**seeded).choices[0].text == client.completions.create(**seeded).choices[0].text
    forced = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=6, temperature=0,
                                       extra_body={"min_tokens": 6, "ignore_eos": True})
    assert forced.usage.completion_tokens == 6 and forced.choices[0].finish_reason == "length"
    two = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=4, n=2, seed=3, temperature=1.0)
    assert sorted(c.index for c in two.choices) == [0, 1] and two.usage.completion_tokens == 8


def test_stop_strings_and_n_in_chat_stream(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, n=2, seed=1,
                                                 stream=True))
    by_index = {0: [], 1: []}
    for c in chunks:
        by_index[c.choices[0].index].append(c.choices[0])
    for choices in by_index.values():
        assert choices[0].delta.role == "assistant"
        assert [c.finish_reason for c in choices[:-1]] == [None] * (len(choices) - 1)
        assert choices[-1].finish_reason in ("stop", "length")


def test_models_and_unknown_model(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)


def test_response_format_json_object_gives_a_json_object(client):
    # Structured outputs in full: tests/server/test_structured_outputs_api.py.
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60, temperature=0,
                                         response_format={"type": "json_object"})
    text = out.choices[0].message.content
    assert text.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_errors_reach_the_sdk_with_their_message(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128 tokens"):
        client.completions.create(model="tiny", prompt="hello", max_tokens=500)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=-1)
