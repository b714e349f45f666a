"""Sampler: the next token of every row of a step, drawn on rank 0 on the logits' device.

All rows are processed together as [b, V] tensors; rows differ only through per-row setting
tensors, so nothing loops over rows on the device and nothing waits for the device per row.
The order, per row (as vLLM and Hugging Face apply them):

    logits -> structured-output bitmask (disallowed tokens: -inf)
           -> + logit_bias -> min_tokens ban (eos, stop ids: -inf) -> repetition penalty
           -> presence/frequency penalties                      = "penalized"
           -> logprobs reported = log_softmax(penalized)           (see below)
           -> greedy rows (temperature 0): argmax(penalized)
           -> / temperature -> top-k -> top-p -> min-p            = "processed" (-inf = removed)
           -> sample: argmax(processed + Gumbel noise)

Reported logprobs are those of the penalized distribution, before temperature and truncation:
they say how likely the model (with the user's biases and penalties) found a token, whatever
sampling knobs picked it, and they stay finite for tokens that top-k/top-p cut. (vLLM calls
this choice "processed_logprobs" and the model's own "raw_logprobs".)

Randomness is stateless: the noise of row r at vocabulary index j is a hash of (seed,
sample_index, output_position, j), computed with int64 tensor ops. So a seeded request draws
the same tokens alone, in any batch, in any order, and after preemption and recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

from tpserve.engine.sampling_params import SamplingParams

_MASK32 = 0xFFFF_FFFF
_CPU_BLOCK_ELEMENTS = 1 << 17  # [rows, V] int64 blocks of ~1 MiB for the noise on the CPU
# vLLM's rule: below this temperature a row is greedy. Dividing by a tinier one could overflow
# float32 to inf (every positive logit tying), and the distribution is an argmax there anyway.
_GREEDY_BELOW = 1e-5


class SamplingRow(NamedTuple):
    """What one row of a step samples with (a plain tuple in this order works too)."""

    params: SamplingParams
    # The tokens so far; read only by penalties (params.penalizes_history), may be empty otherwise.
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    seed: int  # always set: the engine draws one for unseeded requests
    sample_index: int  # which of the request's n samples
    output_position: int  # the number of output tokens so far: which output token this row draws
    # The row's structured-output bitmask ([ceil(V / 32)] int32, bit j allows token j); None: unconstrained.
    allowed: np.ndarray | None = None


@dataclass
class SamplingBatch:
    """Per-row settings of one step as tensors on the logits' device, plus host-side facts
    (which features any row uses) so the sampler skips whole stages without a device sync."""

    vocab_size: int
    greedy: torch.Tensor  # [b] bool: temperature 0 (below 1e-5, as vLLM)
    temperature: torch.Tensor  # [b] float32; 1.0 on greedy rows, so dividing is harmless
    top_k: torch.Tensor  # [b] int64 in [1, V]; V = off
    top_p_cutoff: torch.Tensor  # [b] float32: 1 - top_p, computed in float64 as HF does; -1 = off
    min_p: torch.Tensor  # [b] float32
    repetition_penalty: torch.Tensor  # [b] float32
    presence_penalty: torch.Tensor  # [b] float32
    frequency_penalty: torch.Tensor  # [b] float32
    noise_key: torch.Tensor  # [b] int64 in [0, 2^32): hash of (seed, sample_index, output_position)
    # Token lists padded with V (scattered into a [b, V + 1] buffer whose last column is dropped);
    # None when no row needs them.
    seen_token_ids: torch.Tensor | None  # [b, L] prompt + output, rows with a repetition penalty
    output_token_ids: torch.Tensor | None  # [b, L] output, rows with presence/frequency penalties
    bias_token_ids: torch.Tensor | None  # [b, L]
    bias_values: torch.Tensor | None  # [b, L] float32
    banned_token_ids: torch.Tensor | None  # [b, L] eos and stop ids of rows short of min_tokens
    # Structured outputs: the constrained rows and their bitmasks; None when no row is constrained.
    bitmask_rows: torch.Tensor | None  # [k] int64
    bitmask: torch.Tensor | None  # [k, ceil(V / 32)] int32
    # Host-side facts.
    all_greedy: bool
    any_greedy: bool
    max_top_k: int  # largest k of rows using top-k; 0 = no row does
    any_top_p: bool
    any_min_p: bool
    num_top_logprobs: int  # most top logprobs any row asks for; 0 = none
    any_logprobs: bool  # some row asks for logprobs (0 included: the sampled token's alone)

    @classmethod
    def build(
        cls,
        rows: Sequence[SamplingRow | tuple],
        vocab_size: int,
        eos_token_ids: Sequence[int],
        device: torch.device | str,
    ) -> SamplingBatch:
        V = vocab_size
        rows = [SamplingRow(*row) for row in rows]
        floats, ints = [], []  # one host->device copy for each, then views per field
        seen, outputs, bias_ids, bias_values, banned = [], [], [], [], []
        for row in rows:
            p = row.params
            greedy = p.temperature < _GREEDY_BELOW
            top_k = V if p.top_k == 0 else min(p.top_k, V)  # top_k > V keeps everything: off
            # top_p = 1 is off: a cutoff of -1 removes nothing (0 would drop underflowed tokens).
            top_p_cutoff = 1.0 - p.top_p if p.top_p < 1.0 else -1.0
            floats.append((1.0 if greedy else p.temperature, top_p_cutoff, p.min_p,
                           p.repetition_penalty, p.presence_penalty, p.frequency_penalty))
            seed = row.seed & 0xFFFF_FFFF_FFFF_FFFF  # any Python int; negative ones wrap
            ints.append((greedy, top_k, seed & _MASK32, seed >> 32, row.sample_index & _MASK32,
                         row.output_position & _MASK32))
            seen.append([*row.prompt_token_ids, *row.output_token_ids] if p.repetition_penalty != 1.0 else [])
            uses_output = p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            outputs.append(list(row.output_token_ids) if uses_output else [])
            bias = p.logit_bias or {}
            bias_ids.append(list(bias))
            bias_values.append(list(bias.values()))
            ban = []
            # A grammar decides where a constrained output ends: banning eos could leave no token allowed.
            if row.output_position < p.min_tokens and row.allowed is None:
                ban = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            banned.append(ban)
            for token_id in bias_ids[-1] + ban:
                if not 0 <= token_id < V:
                    raise ValueError(f"token id {token_id} in logit_bias or stop_token_ids must be < vocab_size={V}")

        f = _to_device(torch.tensor(floats, dtype=torch.float32).reshape(-1, 6).T.contiguous(), device)  # [6, b]
        i = _to_device(torch.tensor(ints, dtype=torch.int64).reshape(-1, 6).T.contiguous(), device)  # [6, b]
        greedy = [row[0] for row in ints]
        masked = [r for r, row in enumerate(rows) if row.allowed is not None]
        top_ks = [row[1] for row in ints if row[1] < V]
        return cls(
            vocab_size=V,
            greedy=i[0].bool(),
            temperature=f[0],
            top_k=i[1],
            top_p_cutoff=f[1],
            min_p=f[2],
            repetition_penalty=f[3],
            presence_penalty=f[4],
            frequency_penalty=f[5],
            noise_key=noise_key(i[2], i[3], i[4], i[5]),
            seen_token_ids=_padded(seen, V, torch.int64, device),
            output_token_ids=_padded(outputs, V, torch.int64, device),
            bias_token_ids=_padded(bias_ids, V, torch.int64, device),
            bias_values=_padded(bias_values, 0.0, torch.float32, device),
            banned_token_ids=_padded(banned, V, torch.int64, device),
            bitmask_rows=_to_device(torch.tensor(masked, dtype=torch.int64), device) if masked else None,
            bitmask=_to_device(torch.from_numpy(np.stack([rows[r].allowed for r in masked])), device)
            if masked else None,
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            max_top_k=max(top_ks, default=0),
            any_top_p=any(row[1] > 0.0 for row in floats),
            any_min_p=any(row[2] > 0.0 for row in floats),
            num_top_logprobs=max((row.params.logprobs or 0 for row in rows), default=0),
            any_logprobs=any(row.params.logprobs is not None for row in rows),
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [b] int64
    # [b] float32: log-prob of each sampled token (penalized distribution); None when no row asks
    # for logprobs (the log-sum-exp over the vocabulary costs as much as the argmax).
    logprobs: torch.Tensor | None
    # The most likely tokens and their logprobs, sorted descending; n = most any row asked for
    # (a row asking fewer takes its first ones). None when no row asks.
    top_logprob_ids: torch.Tensor | None  # [b, n] int64
    top_logprobs: torch.Tensor | None  # [b, n] float32


class Sampler:
    """Stateless: everything a step needs is in its SamplingBatch."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits [b, V] (any float dtype, any device) -> one token per row, without a sync."""
        penalized = self.penalize(logits, batch)  # [b, V] float32
        if batch.all_greedy:
            token_ids = penalized.argmax(dim=-1)
        else:
            processed = self.truncate(penalized / batch.temperature[:, None], batch)
            token_ids = sample_gumbel(processed, batch.noise_key)
            if batch.any_greedy:
                token_ids = torch.where(batch.greedy, penalized.argmax(dim=-1), token_ids)
        if not batch.any_logprobs:
            return SamplerOutput(token_ids, None, None, None)
        token_logprobs, top_ids, top_logprobs = gather_logprobs(penalized, token_ids, batch.num_top_logprobs)
        return SamplerOutput(token_ids, token_logprobs, top_ids, top_logprobs)

    @staticmethod
    def penalize(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Bias, min_tokens ban and penalties: [b, V] -> [b, V] float32; the input is never changed.

        Each touches only the listed tokens: gathers and scatters over [b, L] in a [b, V + 1]
        copy whose last column absorbs the padding (id V) and is dropped. A token listed twice
        is written twice with the same value, so duplicates are harmless.
        """
        V = batch.vocab_size
        if batch.bitmask is not None:
            logits = apply_bitmask(logits, batch.bitmask_rows, batch.bitmask)  # a float32 copy
        lists = (batch.bias_token_ids, batch.banned_token_ids, batch.seen_token_ids, batch.output_token_ids)
        if all(ids is None for ids in lists):
            return logits.float()
        buf = torch.nn.functional.pad(logits.float(), (0, 1))  # [b, V + 1], a copy
        if batch.bias_token_ids is not None:
            buf.scatter_add_(1, batch.bias_token_ids, batch.bias_values)
        if batch.banned_token_ids is not None:
            buf.scatter_(1, batch.banned_token_ids, float("-inf"))  # after the bias: no bias lifts a ban
        if batch.seen_token_ids is not None:
            # CTRL / HF: a seen token's logit is divided by the penalty when positive and
            # multiplied when negative: both make it less likely for a penalty > 1.
            ids, penalty = batch.seen_token_ids, batch.repetition_penalty[:, None]  # [b, L], [b, 1]
            x = buf.gather(1, ids)
            buf.scatter_(1, ids, torch.where(x < 0, x * penalty, x / penalty))
        if batch.output_token_ids is not None:
            # OpenAI: logit -= count * frequency_penalty + (count > 0) * presence_penalty.
            ids = batch.output_token_ids  # [b, L]
            counts = torch.zeros_like(buf).scatter_add_(1, ids, torch.ones_like(ids, dtype=buf.dtype))  # [b, V + 1]
            x = buf.gather(1, ids) - counts.gather(1, ids) * batch.frequency_penalty[:, None]
            buf.scatter_(1, ids, x - batch.presence_penalty[:, None])
        return buf[:, :V]

    @staticmethod
    def truncate(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Top-k, then top-p, then min-p (HF's order), each removing tokens by setting -inf.

        Each keeps every token tied with its last kept one, so ties never make the result
        depend on sort order; without ties the kept sets equal Hugging Face's exactly.
        """
        V, inf = batch.vocab_size, float("-inf")
        if batch.any_top_p:
            # One ascending sort serves both; top-k masks in sorted order, which keeps it sorted.
            sorted_logits = logits.sort(dim=-1).values  # [b, V] ascending
            if batch.max_top_k:
                kth = sorted_logits.gather(1, (V - batch.top_k)[:, None])  # [b, 1], the k-th largest
                sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, inf)
                logits = logits.masked_fill(logits < kth, inf)
            # HF: drop the tokens whose ascending cumulative mass is <= 1 - top_p, never the top one.
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [b, V], nondecreasing
            removed = cumulative <= batch.top_p_cutoff[:, None]
            removed[:, -1] = False
            # `removed` is a prefix of the sorted row; the first kept value is the threshold.
            threshold = sorted_logits.gather(1, removed.sum(dim=-1, keepdim=True))  # [b, 1]
            logits = logits.masked_fill(logits < threshold, inf)
        elif batch.max_top_k:
            # Only top-k: a partial top-k up to the largest k is much cheaper than a sort.
            top = logits.topk(batch.max_top_k, dim=-1).values  # [b, max_k] descending
            kth = top.gather(1, (batch.top_k.clamp(max=batch.max_top_k) - 1)[:, None])  # [b, 1]
            kth = kth.masked_fill((batch.top_k == V)[:, None], inf)  # rows without top-k keep all
            logits = logits.masked_fill(logits < kth, inf)
        if batch.any_min_p:
            probs = logits.softmax(dim=-1)  # [b, V]
            floor = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [b, 1]
            logits = logits.masked_fill(probs < floor, inf)
        return logits


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """A float32 copy of logits [b, V] where rows[r]'s tokens that words[r] disallows are -inf.

    words [k, W] int32 holds bit j % 32 of word j // 32 for token j; read as little-endian bytes,
    that is bit j % 8 of byte j // 8, so one lookup of each byte in a [256, 8] table unpacks it.
    Tokens past 32 W (a model vocabulary larger than the grammar's) are disallowed.
    """
    b, V = logits.shape
    k = words.shape[0]
    table = (torch.arange(256, device=words.device)[:, None] >> torch.arange(8, device=words.device)) & 1  # [256, 8]
    allowed = table.bool()[words.contiguous().view(torch.uint8).long()].reshape(k, -1)  # [k, 32 W]
    if allowed.shape[1] < V:
        allowed = torch.nn.functional.pad(allowed, (0, V - allowed.shape[1]), value=False)
    out = logits.float().clone()  # .float() alone may return logits itself
    out[rows] = out[rows].masked_fill(~allowed[:, :V], float("-inf"))
    return out


def gather_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log_softmax(logits) at `token_ids` [t], and the `num_top` largest [t, num_top] (sorted,
    descending), without materialising the [t, V] log-probs. Also serves prompt logprobs."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [t, 1]
    chosen = logits.gather(1, token_ids[:, None]) - lse  # [t, 1]
    if num_top == 0:
        return chosen[:, 0], None, None
    values, ids = logits.topk(min(num_top, logits.shape[-1]), dim=-1)  # [t, n]
    return chosen[:, 0], ids, values - lse


# --- stateless randomness ---


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer permutation on int64 tensors holding values in [0, 2^32).

    xorshift-multiply-xorshift, two rounds, constants [16 604baa5d 15 43d6ce97 15] from
    Wellons' hash-prospector (avalanche bias 0.165, lower than MurmurHash3's finalizer). Both
    multipliers are < 2^31, so every product is < 2^63: int64 never overflows, so the result is
    the same on every device and backend.
    """
    x = x ^ (x >> 16)  # a fresh tensor: the rest works in place
    x.mul_(0x604BAA5D).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(0x43D6CE97).bitwise_and_(_MASK32)
    x ^= x >> 15
    return x


def noise_key(
    seed_lo: torch.Tensor, seed_hi: torch.Tensor, sample_index: torch.Tensor, position: torch.Tensor
) -> torch.Tensor:
    """[b] int64 in [0, 2^32): one key per row, chained through the hash over its counters."""
    key = torch.full_like(seed_lo, 0x9E3779B9)  # any odd start, so all-zero counters still mix
    for part in (seed_lo, seed_hi, sample_index, position):
        key = hash32(key ^ part)
    return key


def sample_gumbel(logits: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """argmax(logits - log E) = argmax(logits + Gumbel): an exact draw from softmax(logits),
    [b, V] -> [b] int64. Removed tokens (-inf) can never win.

    On the CPU the noise's ~20 elementwise passes over [b, V] int64 temporaries would stream
    through memory; blocks of rows that stay in cache make it ~3x cheaper. One block elsewhere.
    """
    b, V = logits.shape
    vocab = hash32(torch.arange(V, device=logits.device))  # [V], shared by every block
    rows = max(1, _CPU_BLOCK_ELEMENTS // V) if logits.device.type == "cpu" else max(b, 1)
    return torch.cat([
        (logits[r : r + rows] - _exponential(key[r : r + rows], vocab).log_()).argmax(dim=-1)
        for r in range(0, b, rows)
    ])


def _exponential(key: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """[b] row keys, [V] hashed vocabulary ids -> [b, V] float32 Exp(1)."""
    bits = hash32(key[:, None] ^ vocab)  # [b, V] in [0, 2^32)
    # (bits + 0.5) / 2^32 is exact in float64 and lies in (0, 1): never 0 or 1, so the logs stay
    # finite. float64 matters near u = 1 (small E: the Gumbel tail that lets unlikely tokens win).
    u = bits.double().add_(0.5).mul_(2.0**-32)
    return u.log_().neg_().float()


# --- helpers ---


def _padded(lists: list[list], pad: int | float, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Ragged rows -> [b, L] tensor padded with `pad`; None when every row is empty."""
    width = max(map(len, lists), default=0)
    if width == 0:
        return None
    return _to_device(torch.tensor([row + [pad] * (width - len(row)) for row in lists], dtype=dtype), device)


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Pinned and asynchronous on CUDA, so building a batch never waits for the model's step."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
