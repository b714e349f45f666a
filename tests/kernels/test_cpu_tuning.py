"""Choosing CPU linear kernels by timing: the rule against noise, the cache and its key, the time box."""

from __future__ import annotations

import json

import torch

from tpserve.kernels import cpu_tuning
from tpserve.kernels.cpu_linear import CANDIDATES
from tpserve.kernels.cpu_tuning import LinearShape, TuningKey, choose, tune_linears

SHAPES = [LinearShape(24, 16, 8), LinearShape(16, 24, 8), LinearShape(50, 16, 2)]  # buckets 1-8, 1-8, 1-2


def test_a_candidate_replaces_f_linear_only_when_it_wins_by_more_than_the_noise():
    steady = {"torch": [10.0, 10.1, 9.9, 10.0, 10.2], "native": [6.0, 6.1, 5.9, 6.0, 6.2]}
    assert choose(steady) == "native"
    noisy = {"torch": [10.0, 14.0, 9.0, 10.0, 13.0], "native": [9.0, 12.0, 8.0, 9.5, 13.0]}
    assert choose(noisy) == "torch"  # 0.5 faster by median, but the middle half spans 4
    tiny_margin = {"torch": [10.0, 10.0, 10.0], "mm_t": [9.9, 9.9, 9.9]}
    assert choose(tiny_margin) == "torch"  # 1% is not worth leaving F.linear for
    assert choose({"torch": [5.0, 5.0, 5.0], "native": [6.0, 6.0, 6.0], "mm_t": [7.0, 7.0, 7.0]}) == "torch"


def test_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    timed = []
    real = cpu_tuning.time_entry
    monkeypatch.setattr(cpu_tuning, "time_entry", lambda n, k, t, *a: timed.append((n, k, t)) or real(n, k, t, *a))

    first = tune_linears(SHAPES, torch.float32, time_box=60, root=tmp_path)
    wanted = {(24, 16, b) for b in (1, 2, 4, 8)} | {(16, 24, b) for b in (1, 2, 4, 8)} | {(50, 16, 1), (50, 16, 2)}
    assert set(timed) == wanted and len(timed) == len(wanted)
    assert first.measured == len(wanted) and first.unmeasured == 0 and first.path.exists()
    for (n, k), kernels in first.kernels.items():
        for bucket, choice in kernels.choices.items():
            entry = first.entries[f"{n}x{k}@{bucket}"]
            assert choice == entry.choice and choice in entry.median_us
            assert set(entry.median_us) == {c for c, cand in CANDIDATES.items() if cand.runs_here(torch.float32)}

    timed.clear()
    again = tune_linears(SHAPES, torch.float32, time_box=60, root=tmp_path)
    assert timed == [] and again.measured == 0
    assert {s: k.choices for s, k in again.kernels.items()} == {s: k.choices for s, k in first.kernels.items()}
    assert "from the cache" in again.summary()

    # A wider token range measures only the buckets the cache lacks.
    wider = tune_linears([LinearShape(24, 16, 32)], torch.float32, time_box=60, root=tmp_path)
    assert sorted(timed) == [(24, 16, 16), (24, 16, 32)] and wider.measured == 2
    assert list(wider.kernels[24, 16].choices) == [1, 2, 4, 8, 16, 32]


def test_a_changed_key_measures_again(tmp_path, monkeypatch):
    tune_linears(SHAPES[:1], torch.float32, time_box=60, root=tmp_path)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        other_threads = tune_linears(SHAPES[:1], torch.float32, time_box=60, root=tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert other_threads.measured == 4
    changed_source = TuningKey.here(torch.float32, threads)
    monkeypatch.setattr(TuningKey, "here", classmethod(lambda cls, d, t: cpu_tuning.dataclasses.replace(
        changed_source, source="0" * 16)))
    assert tune_linears(SHAPES[:1], torch.float32, time_box=60, root=tmp_path).measured == 4
    assert len(list((tmp_path / "cpu_linear").glob("*.json"))) == 3


def test_a_foreign_or_broken_cache_file_is_measured_over(tmp_path):
    key = TuningKey.here(torch.float32, torch.get_num_threads())
    path = key.file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert tune_linears(SHAPES[:1], torch.float32, time_box=60, root=tmp_path).measured == 4
    body = json.loads(path.read_text())
    body["key"]["threads"] += 1  # a file under this name written for another key
    path.write_text(json.dumps(body))
    assert tune_linears(SHAPES[:1], torch.float32, time_box=60, root=tmp_path).measured == 4


def test_the_time_box_leaves_the_rest_to_f_linear_and_caches_nothing(tmp_path):
    result = tune_linears(SHAPES, torch.float32, time_box=0, root=tmp_path)
    assert result.measured == 0 and result.unmeasured == 10 and not result.path.exists()
    assert all(set(k.choices.values()) == {"torch"} for k in result.kernels.values())
    assert "10 left to F.linear" in result.summary()


def test_bfloat16_times_only_the_candidates_that_compute_it(tmp_path):
    result = tune_linears([LinearShape(24, 16, 2)], torch.bfloat16, time_box=60, root=tmp_path)
    assert {c for e in result.entries.values() for c in e.median_us} == {"torch", "mm_t"}
