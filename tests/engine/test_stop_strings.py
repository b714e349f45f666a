"""StopStringMatcher: stop strings across deltas, held-back text, and which match wins."""

from __future__ import annotations

import random

import pytest

from tpserve.engine.stop_strings import StopStringMatcher


def run(stop: list[str], deltas: list[str], include: bool = False) -> tuple[list[str], str | None]:
    """Feed deltas as the engine does, until a match; then what each call gave out (flush() last
    when nothing matched), and the stop string matched."""
    matcher = StopStringMatcher(stop, include)
    pieces = []
    for delta in deltas:
        out, matched = matcher.feed(delta)
        pieces.append(out)
        if matched is not None:
            return pieces, matched
    return pieces + [matcher.flush()], None


def reference(text: str, stop: list[str], include: bool) -> tuple[str, str | None]:
    """The whole text at once: cut at the stop string completed first (then the one begun first)."""
    found = [(text.find(s) + len(s), text.find(s), s) for s in stop if s in text]
    if not found:
        return text, None
    end, begin, s = min(found)
    return text[: end if include else begin], s


def test_a_stop_string_over_several_deltas_is_held_then_cut():
    assert run(["STOP"], ["ab", "cS", "TO", "Pxyz"]) == (["ab", "c", "", ""], "STOP")


def test_include_stop_str_in_output_holds_nothing_back():
    # The stop string is shown anyway on a match, so its first half may go out at once.
    assert run(["STOP"], ["ab", "cS", "TO", "Pxyz"], include=True) == (["ab", "cS", "TO", "P"], "STOP")
    deltas = ["42.", "\n", "\nQ", ": next"]
    assert run(["\n\nQ:"], deltas, include=True) == (["42.", "\n", "\nQ", ":"], "\n\nQ:")
    assert run(["\n\nQ:"], deltas, include=False) == (["42.", "", "", ""], "\n\nQ:")


def test_held_text_is_released_by_flush():
    assert run(["###"], ["result #", "#"]) == (["result ", "", "##"], None)


def test_a_partial_stop_string_that_diverges_is_released():
    assert run(["<end>"], ["a<e", "nx", "y"]) == (["a", "<enx", "y", ""], None)
    # "aa" stays a prefix of "aab" as the text grows: only the characters that can no longer
    # begin it go out, then the match cuts the rest.
    assert run(["aab"], ["aa", "a", "b"]) == (["", "a", ""], "aab")


def test_the_first_stop_string_completed_wins():
    # "lo w" is complete before "world" is: earlier in the list or not, whole text or per character.
    for stop in (["world", "lo w"], ["lo w", "world"]):
        assert run(stop, ["hello world"]) == (["hel"], "lo w")
        assert "".join(run(stop, list("hello world"))[0]) == "hel"
    # Completed by the same character: the one that begins first.
    assert run(["bc", "abc"], ["xabcd"]) == (["x"], "abc")
    # "bc" is complete before "abcd", though "abcd" begins first: the answer must not depend on
    # how the text was split into deltas.
    assert run(["abcd", "bc"], ["abcd"]) == (["a"], "bc")
    assert run(["abcd", "bc"], list("abcd")) == (["", "", "a"], "bc")


def test_text_after_the_stop_string_is_dropped():
    assert run(["STOP"], ["fooSTOPbar", "more"]) == (["foo"], "STOP")
    assert run(["STOP"], ["STOP"]) == ([""], "STOP")
    assert run(["STOP"], ["fooSTOPbar"], include=True) == (["fooSTOP"], "STOP")


def test_multibyte_stop_strings():
    assert run(["😀!", "。"], ["hi 😀", "!"]) == (["hi ", ""], "😀!")
    assert run(["😀!", "。"], ["日本語", "。"]) == (["日本語", ""], "。")


def test_no_stop_strings_passes_everything_through():
    assert run([], ["a", "b"]) == (["a", "b", ""], None)


def test_only_the_tail_is_kept():
    """Each call looks at len(longest stop) - 1 characters before the delta, not at the output."""
    matcher = StopStringMatcher(["STOP", "x"], include_stop_str_in_output=False)
    assert matcher.feed("y" * 100_000 + "ST") == ("y" * 100_000, None)
    assert matcher._tail == "yST"  # the state: 3 characters, 2 of them held
    assert matcher.feed("OP") == ("", "STOP")


def test_bad_use_is_refused():
    with pytest.raises(ValueError, match=r"stop\[1\]='' must be a non-empty string"):
        StopStringMatcher(["ok", ""], include_stop_str_in_output=False)
    matcher = StopStringMatcher(["STOP"], include_stop_str_in_output=False)
    matcher.feed("STOP")
    with pytest.raises(RuntimeError, match="already ended"):
        matcher.feed("more")


@pytest.mark.parametrize("include", [False, True])
def test_random_texts_and_splits_agree_with_the_whole_text(include):
    """Over a 3-letter alphabet stop strings overlap, nest and half-match all the time. For any
    split into deltas: the output is the whole text's; what has gone out is always a prefix of it
    (no part of a stop string shown, then cut); and without include, only a possible beginning
    of a stop string is held back."""
    rng = random.Random(0)
    for _ in range(2000):
        stop = rng.sample(["abc", "bca", "cc", "aab", "b", "cabca", "aaaa"], rng.randint(1, 3))
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
        num_cuts = min(max(len(text) - 1, 0), rng.randint(0, 6))
        cuts = sorted(rng.sample(range(1, len(text)), num_cuts))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        expected, expected_stop = reference(text, stop, include)

        matcher, out, fed = StopStringMatcher(stop, include), "", ""
        matched = None
        for delta in deltas:
            piece, matched = matcher.feed(delta)
            out, fed = out + piece, fed + delta
            assert expected.startswith(out)
            if matched is not None:
                break
            held = fed[len(out) :]
            assert held == "" or (not include and any(s.startswith(held) and s != held for s in stop))
        if matched is None:
            out += matcher.flush()
        assert (out, matched) == (expected, expected_stop), (stop, deltas)
