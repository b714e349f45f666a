"""Shared test helpers: small random Hugging Face models, and a paged-cache stepper."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

from tpserve.engine.model_runner import ModelRunner
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.protocol import NewSequence, StepPlan
from tpserve.model.builder import GPTModelBuilder, GPTModelConfig
from tpserve.model.checkpoint.hf import gpt_config_from_hf, megatron_state_dict_from_hf
from tpserve.model.checkpoint.load import load_weights
from tpserve.model.checkpoint.sources import DictSource
from tpserve.model.core_attention import AttentionBackend
from tpserve.model.gpt_model import GPTModel
from tpserve.model.inference_params import InferenceParams
from tpserve.model.kv_cache import KVCache
from tpserve.model.packed_seq_params import PackedSeqParams
from tpserve.model.parallel_state import ParallelState
from tpserve.model.pipeline_parallel import forward_step

# The `tpserve` console script beside this Python, as users run it: `python -m tpserve...` would put
# the working directory (the repository root) on sys.path, where our kernels/ folder shadows
# Hugging Face's `kernels`.
TPSERVE = str(Path(sys.executable).with_name("tpserve"))

# What the engine would otherwise choose by the machine: the dtype (bfloat16 on CPUs with native
# bf16) and each linear's kernel (timed at the first start). Pinned, the suite gives the same
# answers on every CI machine and never spends a start timing kernels.
ENGINE_PINS = {"dtype": torch.float32, "cpu_kernels": "native"}
SERVE_PINS = ["--dtype", "float32", "--cpu-kernels", "native"]

# A large init std makes logits peaked (std ~1.5), so a wrong weight shows, and greedy picks are stable.
INIT_STD = 0.2

HF_CASES = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=301, n_embd=64, n_layer=2, n_head=4, n_positions=128
    ),
    "gpt2_untied": lambda: transformers.GPT2Config(
        vocab_size=301, n_embd=64, n_layer=2, n_head=4, n_positions=128, tie_word_embeddings=False
    ),
    "llama_gqa": lambda: transformers.LlamaConfig(
        vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
    ),
    "llama_mha_tied": lambda: transformers.LlamaConfig(
        vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
    ),
    "llama_linear_rope": lambda: transformers.LlamaConfig(
        vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    # Partial rotary (rotary_percent 0.25), LayerNorm with bias, qkv bias.
    "stablelm_partial_rotary": lambda: transformers.StableLmConfig(
        vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, use_qkv_bias=True,
    ),
    "qwen2_qkv_bias": lambda: transformers.Qwen2Config(
        vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    ),
    "mistral_sliding_window": lambda: transformers.MistralConfig(
        vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=5,
    ),
}

# Mixtures of experts (tests/model/test_moe.py): 8 experts, top 2 (one case top 1), the router's
# two softmax orders (Mixtral: over the chosen logits; Qwen2-MoE norm_topk_prob=False: over all),
# a gated shared expert, and dense and MoE layers interleaved (decoder_sparse_step=2).
MOE_CASES = {
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=301, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_local_experts=8, num_experts_per_tok=2,
    ),
    "mixtral_top1": lambda: transformers.MixtralConfig(
        vocab_size=301, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_local_experts=8, num_experts_per_tok=1,
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        vocab_size=301, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=80, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2,
    ),
    # q and k normalised per head (Qwen3) and across a token's heads (OLMoE)
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        vocab_size=301, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True,
    ),
    "olmoe": lambda: transformers.OlmoeConfig(
        vocab_size=301, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_experts=8, num_experts_per_tok=2,
    ),
    "qwen2_moe_norm_topk": lambda: transformers.Qwen2MoeConfig(
        vocab_size=301, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    ),
}

_MODEL_CLASSES = {
    "mixtral": transformers.MixtralForCausalLM,
    "qwen3_moe": transformers.Qwen3MoeForCausalLM,
    "olmoe": transformers.OlmoeForCausalLM,
    "qwen2_moe": transformers.Qwen2MoeForCausalLM,
    "gpt2": transformers.GPT2LMHeadModel,
    "llama": transformers.LlamaForCausalLM,
    "stablelm": transformers.StableLmForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "mistral": transformers.MistralForCausalLM,
}


def random_hf_model(case: str, seed: int = 0, **overrides):
    """A small Hugging Face model with random weights (biases and norms random too), fp32, eager."""
    hf_config = (HF_CASES | MOE_CASES)[case]()
    for key, value in overrides.items():
        setattr(hf_config, key, value)
    hf_config.initializer_range = INIT_STD
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[hf_config.model_type](hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Default init puts norms at 1 and biases at 0; a loader that dropped them would pass.
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.copy_(p + 0.1 * torch.randn_like(p))
    return model


def converted(hf_model) -> tuple[GPTModelConfig, dict[str, torch.Tensor]]:
    """Our config and Megatron-named full tensors for a Hugging Face model; logits gathered."""
    config = gpt_config_from_hf(hf_model.config)
    config.parallel_output = False
    return config, megatron_state_dict_from_hf(hf_model.state_dict(), config)


def build(
    config: GPTModelConfig,
    state: dict[str, torch.Tensor],
    ps: ParallelState = ParallelState(),
    device: str = "cpu",
    attention_backend: AttentionBackend | None = None,
) -> GPTModel:
    model = GPTModelBuilder(config.with_tensor_parallel_size(ps.tensor_model_parallel_size)).build_model(ps, device, attention_backend)
    load_weights(model, DictSource(state), ps)
    return model


@torch.no_grad()
def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    """[s, V] logits of one sequence, every position."""
    return hf_model(torch.tensor([token_ids])).logits[0]


class PagedStepper:
    """Runs steps of packed sequences through the paged KV cache, as an engine would.

    Blocks are handed out in a shuffled order, so a sequence's blocks are scattered through
    the cache and a wrong block-table lookup shows. Under pipeline parallelism every stage's
    ranks step together (`parallel_state`); only the last stage gets logits, the others None.
    """

    def __init__(
        self, model: GPTModel, num_blocks: int = 96, block_size: int = 4, seed: int = 0, max_num_tokens: int = 512,
        parallel_state: ParallelState = ParallelState(),
    ) -> None:
        self.model = model
        self.parallel_state = parallel_state
        self.block_size = block_size
        cache = KVCache(model.config, num_blocks, block_size, dtype=model.config.params_dtype,
                        num_layers=model.num_local_layers)
        model.bind_kv_cache(cache)
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: dict[object, list[int]] = {}
        self.lens: dict[object, int] = {}
        self.params = InferenceParams(
            max_num_seqs=128, max_num_tokens=max_num_tokens, max_blocks_per_seq=num_blocks, block_size=block_size
        )

    @torch.no_grad()
    def step(self, batch: list[tuple[object, list[int]]]) -> list[torch.Tensor] | None:
        """Feed each (sequence key, new token ids); the logits [new tokens, V] of each."""
        query_lens, context_lens, tables, ids = [], [], [], []
        for key, tokens in batch:
            ctx = self.lens.get(key, 0) + len(tokens)
            table = self.tables.setdefault(key, [])
            while len(table) * self.block_size < ctx:
                table.append(self.free.pop())
            self.lens[key] = ctx
            query_lens.append(len(tokens))
            context_lens.append(ctx)
            tables.append(table)
            ids.extend(tokens)
        positions = self.params.prepare(query_lens, context_lens, tables)
        logits = forward_step(
            self.model, torch.tensor(ids), positions, self.parallel_state, inference_params=self.params,
            packed_seq_params=PackedSeqParams.from_lengths(query_lens),
        )
        return None if logits is None else list(logits.split(query_lens))


def greedy_decode(model: GPTModel, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens for every prompt, all in one batch: one packed prefill, then decode steps
    (end-of-sequence does not stop). Also the logits of each prompt's last token."""
    stepper = PagedStepper(model, num_blocks=sum(-(-(len(p) + steps) // 16) for p in prompts),
                           block_size=16, max_num_tokens=sum(map(len, prompts)))
    logits = stepper.step(list(enumerate(prompts)))
    first = torch.stack([row[-1] for row in logits])  # [b, V]
    out = [[int(t)] for t in first.argmax(-1)]
    for _ in range(steps - 1):
        logits = stepper.step([(i, [toks[-1]]) for i, toks in enumerate(out)])
        for toks, row in zip(out, logits):
            toks.append(int(row[-1].argmax()))
    return out, first


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "def add(a, b):\n    return a + b\n",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 \u4f60\u597d\u4e16\u754c \U0001F600 \U0001F680 ",
    "Once upon a time there was a small model that served tokens very fast. ",
]


def tiny_tokenizer(folder) -> "transformers.PreTrainedTokenizerFast":
    """A byte-level BPE tokenizer of ~300 tokens trained here, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def random_checkpoint(folder, case: str = "llama_gqa", seed: int = 0, max_position_embeddings: int = 256):
    """A tpserve checkpoint of a small random Hugging Face model with the tiny tokenizer.
    Returns (checkpoint path, the Hugging Face model it was made from)."""
    from pathlib import Path

    from tpserve.model.checkpoint import save_checkpoint

    folder = Path(folder)
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    hf_model = random_hf_model(case, seed, vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings)
    config, state = converted(hf_model)
    path = save_checkpoint(folder / "checkpoint", config, state, tokenizer_dir=folder / "tokenizer", dtype=torch.float32)
    return path, hf_model


class StepPlanner:
    """Step plans for a `ModelRunner`, shaped as the engine sends them: a sequence is sent whole
    the first time it is scheduled and prefilled in that step, then fed as deltas (its new
    tokens, its new blocks). Blocks come from a shuffled free list. Greedy, with top-3 logprobs."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self.params = SamplingParams(temperature=0.0, logprobs=3, max_tokens=1000)

    def plan(self, batch: dict[int, list[int]]) -> bytes:
        """The encoded plan of one step feeding each sequence id its new tokens."""
        plan = StepPlan()
        for seq_id, tokens in batch.items():
            new = seq_id not in self.tables
            table = self.tables.setdefault(seq_id, [])
            start, first_new_block = self.lens.get(seq_id, 0), len(table)
            self.lens[seq_id] = start + len(tokens)
            while len(table) * self.block_size < self.lens[seq_id]:
                table.append(self.free.pop())
            if new:
                plan.new_sequences.append(NewSequence(seq_id, list(tokens), len(tokens), list(table), self.params, seq_id, 0))
                first_new_block = len(table)
            plan.seq_ids.append(seq_id)
            plan.num_computed_tokens.append(start)
            plan.num_scheduled_tokens.append(len(tokens))
            plan.num_samples.append(1)
            plan.appended_tokens.append([] if new else list(tokens))
            plan.block_starts.append(first_new_block)
            plan.block_tails.append(table[first_new_block:])
        return plan.encode()


def model_runner(model: GPTModel, device: str = "cpu", cuda_graph_batch_sizes: list[int] = (), num_blocks: int = 64,
                 block_size: int = 4) -> ModelRunner:
    """A driver-rank `ModelRunner` over a fresh cache, up to 8 sequences and 1024 tokens a step."""
    cache = KVCache(model.config, num_blocks, block_size, dtype=model.config.params_dtype, device=device)
    model.bind_kv_cache(cache)
    return ModelRunner(model, cache, max_num_seqs=8, max_num_batched_tokens=1024, max_blocks_per_seq=num_blocks,
                       eos_token_ids=[], parallel_state=ParallelState(), device=torch.device(device),
                       cuda_graph_batch_sizes=list(cuda_graph_batch_sizes))


def eager_capture_stand_in(replays: list[int]):
    """A stand-in for `cuda_graph.capture_graph` where no graph can be captured: "capture" runs
    the forward once, and each replay runs it again on the same static buffers, appending the
    batch size it serves (the runner's forward is `functools.partial(_forward, size)`) to `replays`."""

    def capture(forward, pool):
        forward()
        return lambda: (replays.append(forward.args[0]), forward()), pool

    return capture


def compare_runners(eager, graphed, steps: list[list[int]], prompts: dict[int, list[int]], rtol: float, atol: float):
    """Run the same plans through two `ModelRunner`s: a sequence id's first step feeds its
    prompt, each later one the token the eager runner sampled last. Every sample must agree
    (token, logprob and top-3), and so must the caches at the end. `steps` lists the sequence
    ids of each step."""
    planner = StepPlanner(eager.kv_cache.num_blocks, eager.kv_cache.block_size, seed=1)
    last: dict[int, int] = {}
    for seq_ids in steps:
        data = planner.plan({i: [last[i]] if i in last else prompts[i] for i in seq_ids})
        want = eager.execute(StepPlan.decode(data))
        got = graphed.execute(StepPlan.decode(data))
        assert sorted(got.samples) == sorted(want.samples) == sorted(seq_ids)
        for i in seq_ids:
            (g,), (w,) = got.samples[i], want.samples[i]
            assert g.token_id == w.token_id, (seq_ids, i)
            torch.testing.assert_close(g.logprob, w.logprob, rtol=rtol, atol=atol)
            assert [t for t, _ in g.top] == [t for t, _ in w.top]
            torch.testing.assert_close([v for _, v in g.top], [v for _, v in w.top], rtol=rtol, atol=atol)
            last[i] = w.token_id
    # Both stored the same keys and values, and nothing else (a padding row stores nothing).
    torch.testing.assert_close(graphed.kv_cache.buffer, eager.kv_cache.buffer, rtol=rtol, atol=atol)

