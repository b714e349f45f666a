"""Folding the engine's deltas into whole outputs (`RequestOutput.start` / `add`), by hand."""

from __future__ import annotations

from tpserve.engine.outputs import CompletionOutput, RequestOutput
from tpserve.engine.sequence import Logprob


def delta(samples: list[CompletionOutput], finished: bool = False, prompt_logprobs=None) -> RequestOutput:
    return RequestOutput("r", "Hi", [1, 2], prompt_logprobs, samples, finished)


def lp(token_id: int) -> Logprob:
    return Logprob(token_id, -float(token_id))


def test_two_samples_fold_into_whole_outputs_and_the_deltas_stay_unchanged():
    first = delta([CompletionOutput(0, " a", [5], -5.0, [lp(5)]), CompletionOutput(1, " b", [6], -6.0, [lp(6)])],
                  prompt_logprobs=[None, lp(2)])
    whole = RequestOutput.start(first)
    whole.add(delta([CompletionOutput(1, "c", [7], -13.0, [lp(7)], "stop", 7)]))
    whole.add(delta([CompletionOutput(0, "", [], -5.0, [], "abort")], finished=True))
    assert [(o.index, o.text, o.token_ids, o.cumulative_logprob, o.finish_reason, o.stop_reason)
            for o in whole.outputs] == [(0, " a", [5], -5.0, "abort", None), (1, " bc", [6, 7], -13.0, "stop", 7)]
    assert [e.token_id for e in whole.outputs[1].logprobs] == [6, 7]
    assert whole.finished and whole.prompt_logprobs == [None, lp(2)]  # from the first delta only
    assert first.outputs[1].token_ids == [6] and first.outputs[1].text == " b"  # start copied them


def test_a_sample_first_seen_later_is_placed_by_its_index():
    whole = RequestOutput.start(delta([CompletionOutput(1, "x", [3], None, None)]))
    whole.add(delta([CompletionOutput(0, "y", [4], None, None)]))
    assert [(o.index, o.text) for o in whole.outputs] == [(0, "y"), (1, "x")]
    snapshot = whole.copy()
    whole.add(delta([CompletionOutput(0, "z", [8], None, None)]))
    assert snapshot.outputs[0].token_ids == [4] and whole.outputs[0].token_ids == [4, 8]
