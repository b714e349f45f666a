"""Stop strings in streamed text: found across deltas, and never half-shown.

A stop string may arrive over several tokens ("<|", "end", "|>"). Text that could still be the
start of a stop string is held back until it either completes one (and is cut off) or can no
longer (and is released), so a client never sees the first half of a stop string it should not
see. Each call looks only at the text that can hold a new match, so its cost does not grow with
the output.

Per sequence and step, the engine feeds the detokenizer's delta. When the output ends for another
reason, it feeds the detokenizer's flush() too (a stop string may end in it), then takes flush().
"""

from __future__ import annotations

import re


class StopStringMatcher:
    """The stop strings of one sequence, fed its text delta by delta.

    The stop string that ends the output is the first one to be completed; among those completed by
    the same character, the one that starts first. So the answer does not depend on how the text
    was split into deltas: with stop=["abcd", "bc"], "abc" stops at "bc" whether it came as one
    delta or three.
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool) -> None:
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}]={s!r} must be a non-empty string")
        self.stop = list(dict.fromkeys(stop))  # duplicates removed, order kept
        self.include_stop_str_in_output = include_stop_str_in_output
        # A match of s ends in the new delta, so it starts at most len(s) - 1 characters before it.
        self._lookback = max((len(s) for s in self.stop), default=1) - 1
        # Any stop string: in most steps one C-level scan finds none, and no more is done.
        self._any_stop = re.compile("|".join(map(re.escape, self.stop))) if self.stop else None
        # A tail equal to a proper prefix of a stop string may still grow into it. The regex finds
        # the leftmost (so the longest) such tail in one C-level scan.
        prefixes = sorted({s[:k] for s in self.stop for k in range(1, len(s))})
        self._prefix_at_end = (
            re.compile("(?:" + "|".join(map(re.escape, prefixes)) + r")\Z") if prefixes else None
        )
        # The last `_lookback` characters fed; its last `_num_held` characters are not yet emitted.
        self._tail = ""
        self._num_held = 0
        self.matched: str | None = None

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Add the newest text; return (text that may be shown now, the stop string matched or None).

        After a match the output is over: the text returned ends just before the stop string
        (or just after it, with include_stop_str_in_output), and nothing more may be fed.

            window = tail + delta
            |<--------- tail --------->|<------ delta ------>|
            |   emitted    |   held    |
                           ^ start     (first character not yet emitted)
            a stop string s found from len(tail) - (len(s) - 1) on ends inside delta
        """
        if self.matched is not None:
            raise RuntimeError(f"stop string {self.matched!r} already ended this output")
        window = self._tail + delta
        start = len(self._tail) - self._num_held
        match = self._first_match(window, len(self._tail))
        if match is not None:
            begin, end, s = match
            self.matched = s
            self._tail, self._num_held = "", 0
            # With nothing emitted past `start` and the held text a prefix of a stop string, a
            # match cannot begin before `start` (it would have been held); so cut >= start.
            cut = end if self.include_stop_str_in_output else begin
            return window[start:cut], s
        # With the stop string shown anyway on a match, nothing needs holding back.
        keep = 0 if self.include_stop_str_in_output else self._held_length(window, start)
        emit = window[start : len(window) - keep]
        self._tail = window[max(0, len(window) - self._lookback) :]
        self._num_held = keep
        return emit, None

    def flush(self) -> str:
        """The output ended for another reason: return the held text (a prefix that never completed)."""
        held = self._tail[len(self._tail) - self._num_held :]
        self._num_held = 0
        return held

    def _first_match(self, window: str, new_from: int) -> tuple[int, int, str] | None:
        """(begin, end, s) of the first stop string to end in window[new_from:] (the delta), or None."""
        if self._any_stop is None or not self._any_stop.search(window):
            return None  # window is at most lookback + delta long, and no match ended before
        found = []  # (end, begin, s): the smallest end is the first completed
        for s in self.stop:
            begin = window.find(s, max(0, new_from - (len(s) - 1)))
            if begin >= 0:
                found.append((begin + len(s), begin, s))
        if not found:
            return None
        end, begin, s = min(found)
        return begin, end, s

    def _held_length(self, window: str, start: int) -> int:
        """Length of the longest tail of window[start:] that is a proper prefix of a stop string.

            window = "... and then <|e"    stop = ["<|end|>"]    ->  3 ("<|e" is held)
        """
        if self._prefix_at_end is None:
            return 0
        match = self._prefix_at_end.search(window, max(start, len(window) - self._lookback))
        return len(window) - match.start() if match else 0
