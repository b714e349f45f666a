"""`StreamState`: what one HTTP request's engine requests have produced, for every route.

The engine sends deltas (tpserve.engine.outputs): a route renders each as it comes, and reads
the whole outputs, folded here, for what needs them: a non-streamed answer, the usage, metrics.
"""

from __future__ import annotations

from tpserve.engine.outputs import RequestOutput


class StreamState:
    def __init__(self) -> None:
        self.outputs: dict[int, RequestOutput] = {}  # by prompt index, whole so far

    def add(self, batch: dict[int, RequestOutput]) -> None:
        """Fold a batch of deltas, {prompt index: delta}."""
        for i, delta in batch.items():
            whole = self.outputs.get(i)
            if whole is None:
                self.outputs[i] = RequestOutput.start(delta)
            else:
                whole.add(delta)

    def finished(self) -> list[RequestOutput]:
        """The finished outputs, in prompt order."""
        return [self.outputs[i] for i in sorted(self.outputs) if self.outputs[i].finished]
