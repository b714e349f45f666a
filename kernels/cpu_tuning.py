"""Choosing each CPU linear's kernel by timing the candidates on this machine, once, cached.

Each entry is one (weight shape, token bucket): every candidate that computes the dtype is
timed in interleaved rounds (a burst of load from elsewhere then hits all of them alike), and
a candidate replaces `F.linear` only when its median beats F.linear's by more than the spread
of either, so a noisy machine does not flip the choice from one start to the next.

The entries are cached in one JSON file per key: CPU model and flags, threads, dtype, torch
version, and a hash of the kernels' sources. Entries the file lacks (a new model's shapes, a
larger batch) are measured and added, smallest token counts first, until a time box runs out;
what it did not reach runs `F.linear` until a later start measures it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tpserve.kernels.cpu_info import cache_root, cpu_flags, cpu_model
from tpserve.kernels.cpu_linear import CANDIDATES, DEFAULT, LinearKernels, buckets_up_to

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_SOURCES = (_HERE / "cpu_linear.py", _HERE / "cpu_tuning.py", _HERE / "cpu_transpose.py",
            _HERE / "csrc" / "linear_cpu.c", _HERE / "csrc" / "transpose_cpu.c")
# Time per entry the rounds aim at; an entry gets at least MIN_ROUNDS whatever it costs.
ENTRY_SECONDS = 0.05
MIN_ROUNDS, MAX_ROUNDS = 3, 15
# A candidate must beat F.linear by more than this share of F.linear's median as well.
MIN_MARGIN = 0.02


@dataclass(frozen=True)
class LinearShape:
    n: int  # output features, this rank's
    k: int  # input features
    max_tokens: int  # the most rows one call gets: the step's token budget, or its sequences


@dataclass(frozen=True)
class TuningKey:
    cpu: str
    flags: str
    threads: int
    dtype: str
    torch: str
    source: str

    @classmethod
    def here(cls, dtype: torch.dtype, threads: int) -> "TuningKey":
        digest = hashlib.sha256()
        for path in _SOURCES:
            digest.update(path.read_bytes())
        return cls(cpu_model(), " ".join(sorted(cpu_flags())), threads, str(dtype).removeprefix("torch."),
                   torch.__version__, digest.hexdigest()[:16])

    def file(self, root: Path) -> Path:
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        return root / "cpu_linear" / f"{digest}.json"


@dataclass
class Entry:
    choice: str
    median_us: dict[str, float]
    spread_us: dict[str, float]


@dataclass
class TuningResult:
    kernels: dict[tuple[int, int], LinearKernels]  # by (n, k)
    entries: dict[str, Entry]  # by entry_name(n, k, bucket); the measured ones, cached or new
    measured: int  # entries timed by this call
    unmeasured: int  # entries the time box left to F.linear
    path: Path
    seconds: float

    def summary(self) -> str:
        if not self.measured and not self.unmeasured:
            return f"CPU linear kernels: {len(self.entries)} entries from the cache {self.path}"
        return (f"CPU linear kernels: {self.measured} (weight shape, tokens) entries timed in {self.seconds:.1f} s, "
                f"{len(self.entries) - self.measured} from the cache, {self.unmeasured} left to F.linear until "
                f"a later start times them; cached in {self.path}")

    def table(self) -> str:
        """One line per entry: the shape, the bucket, each candidate's median (us), the choice."""
        lines = []
        for name, e in self.entries.items():
            times = "  ".join(f"{c} {t:9.1f}" for c, t in e.median_us.items())
            lines.append(f"{name:>20}  {times}  -> {e.choice}")
        return "\n".join(lines)


def entry_name(n: int, k: int, bucket: int) -> str:
    return f"{n}x{k}@{bucket}"


def choose(samples: dict[str, list[float]]) -> str:
    """The fastest candidate by median, unless it beats F.linear by no more than the noise."""
    median = {c: statistics.median(s) for c, s in samples.items()}
    best = min(median, key=median.get)
    if best == DEFAULT or DEFAULT not in samples:
        return best
    margin = max(_spread(samples[best]), _spread(samples[DEFAULT]), MIN_MARGIN * median[DEFAULT])
    return best if median[DEFAULT] - median[best] > margin else DEFAULT


def _spread(samples: list[float]) -> float:
    """The width of the middle half (all of it for three samples)."""
    s = sorted(samples)
    q = (len(s) - 1) // 4
    return s[len(s) - 1 - q] - s[q]


def time_entry(n: int, k: int, tokens: int, dtype: torch.dtype, candidates: list[str]) -> Entry:
    weight = torch.full((n, k), 0.01, dtype=dtype)  # values do not change the time; denormals would
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(0)).to(dtype)
    fns = {c: CANDIDATES[c].fn for c in candidates}
    first = {}
    for c, fn in fns.items():  # warm-up: page faults, packing buffers, OpenMP threads waking
        start = time.perf_counter()
        fn(x, weight)
        first[c] = time.perf_counter() - start
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, int(ENTRY_SECONDS / max(sum(first.values()), 1e-9))))
    samples: dict[str, list[float]] = {c: [] for c in fns}
    for _ in range(rounds):
        for c, fn in fns.items():
            start = time.perf_counter()
            fn(x, weight)
            samples[c].append(time.perf_counter() - start)
    return Entry(
        choose(samples),
        {c: round(statistics.median(s) * 1e6, 1) for c, s in samples.items()},
        {c: round(_spread(s) * 1e6, 1) for c, s in samples.items()},
    )


def tune_linears(
    shapes: list[LinearShape], dtype: torch.dtype, *, time_box: float, root: Path | None = None
) -> TuningResult:
    """Each shape's `LinearKernels`, from the cache where it has them, else measured now (with
    torch's current thread count, which the key records)."""
    start = time.perf_counter()
    widest: dict[tuple[int, int], int] = {}
    for s in shapes:  # a shape met in several places takes its widest token range
        widest[s.n, s.k] = max(s.max_tokens, widest.get((s.n, s.k), 0))
    key = TuningKey.here(dtype, torch.get_num_threads())
    path = key.file(root or cache_root())
    entries = _load(path, key)
    candidates = [c for c, cand in CANDIDATES.items() if cand.runs_here(dtype)]
    todo = sorted((b, n, k) for (n, k), t in widest.items() for b in buckets_up_to(t)
                  if entry_name(n, k, b) not in entries)
    measured = 0
    for bucket, n, k in todo:
        if time.perf_counter() - start > time_box:
            break
        entries[entry_name(n, k, bucket)] = time_entry(n, k, bucket, dtype, candidates)
        measured += 1
    if measured:
        try:
            _store(path, key, entries)
        except OSError as e:  # a read-only home: the choice holds for this run, the next measures again
            logger.warning("could not cache the CPU linear timings in %s: %s", path, e)
    kernels = {
        (n, k): LinearKernels({
            b: entries[entry_name(n, k, b)].choice if entry_name(n, k, b) in entries else DEFAULT
            for b in buckets_up_to(t)
        })
        for (n, k), t in widest.items()
    }
    wanted = {entry_name(n, k, b) for (n, k), kern in kernels.items() for b in kern.choices}
    return TuningResult(kernels, {name: e for name, e in entries.items() if name in wanted}, measured,
                        len(todo) - measured, path, time.perf_counter() - start)


def _load(path: Path, key: TuningKey) -> dict[str, Entry]:
    """The cached entries; none for a missing, unreadable or foreign file (it is rewritten)."""
    try:
        raw = json.loads(path.read_text())
        if raw.get("key") != dataclasses.asdict(key):
            return {}
        return {name: Entry(**e) for name, e in raw["entries"].items() if e.get("choice") in CANDIDATES}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _store(path: Path, key: TuningKey, entries: dict[str, Entry]) -> None:
    """Written whole and renamed into place: engines starting together each leave a complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"key": dataclasses.asdict(key), "entries": {n: dataclasses.asdict(e) for n, e in sorted(entries.items())}}
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(body, f, indent=1)
    os.replace(f.name, path)
