"""When a streamed answer is shown and how much of it: the pacer on a clock the test moves."""

from __future__ import annotations

from surfaces_plugin.config import StreamingSettings
from surfaces_plugin.pacing import Pace, Pacer, Step, readable_end, word_end

PACE = Pace.of(StreamingSettings())  # the shipped defaults: 1 s, 1 → 3 s, 20 edits


def shown(text: str, step: Step) -> str:
    assert step.show is not None, f"expected a send, got {step}"
    return text[: step.show]


def test_sentence_and_line_ends() -> None:
    assert "3 plus 0 is 3. To check"[: readable_end("3 plus 0 is 3. To check")] == "3 plus 0 is 3."
    text = 'He said "stop!" Then'
    assert text[: readable_end(text)] == 'He said "stop!"'
    assert readable_end("It costs 3.5 euros") == 0  # a decimal point ends nothing
    assert readable_end("1. Open the file") == 0  # nor does a list item's number
    text = "Steps:\n1. Open"
    assert text[: readable_end(text)] == "Steps:"  # a line end is a break
    text = "**Note.** Then"
    assert text[: readable_end(text)] == "**Note.**"
    assert readable_end("\n\nHello") == 0  # nothing but blank lines before it
    text = "One. Two. Three"
    assert readable_end(text, start=5) == len("One. Two.")
    assert word_end("one two thr") == len("one two")
    assert word_end("single") == len("single")
    assert word_end("\n\nHel") == len("\n\nHel")  # never a post of blank lines


def test_the_first_post_waits_for_a_complete_sentence() -> None:
    pacer = Pacer(PACE)
    assert pacer.step("", 0, now=5.0) == Step()  # nothing yet: wait for text, no timer
    assert pacer.step("  ", 0, now=5.1) == Step()  # whitespace starts no timer either
    step = pacer.step("3 plus", 0, now=10.0)  # the first words start the timer
    assert step == Step(wait=PACE.first_post_s)
    text = "3 plus 0 is 3. To"
    assert shown(text, pacer.step(text, 0, now=10.3)) == "3 plus 0 is 3."


def test_the_first_post_goes_at_the_deadline_without_a_sentence_end() -> None:
    pacer = Pacer(PACE)
    pacer.step("Well", 0, now=0.0)
    assert pacer.step("Well, let me thi", 0, now=0.99).wait is not None
    text = "Well, let me thi"
    assert shown(text, pacer.step(text, 0, now=1.0)) == "Well, let me"  # whole words only


def test_edits_show_up_to_the_last_sentence_and_the_tail_waits() -> None:
    pacer = Pacer(PACE)
    text = "One. Two"
    first = shown(text, pacer.step(text, 0, now=0.0))
    pacer.sent(0.0, 0.05)
    text = "One. Two three. Four fi"
    step = pacer.step(text, len(first), now=0.5)
    assert step == Step(wait=0.5)  # too soon: one second between the post and the first edit
    assert shown(text, pacer.step(text, len(first), now=1.0)) == "One. Two three."
    pacer.sent(1.0, 1.05)
    # No new sentence end when the next edit is due: the tail waits one more interval, then
    # shows up to its last whole word.
    text = "One. Two three. Four five six seven eig"
    due = 1.0 + pacer.interval()
    assert pacer.step(text, 15, now=due).wait is not None
    assert shown(text, pacer.step(text, 15, now=due + pacer.interval())) == text[: text.rfind(" ")]


def test_the_interval_grows_and_the_edits_are_capped() -> None:
    pacer = Pacer(PACE)
    intervals = []
    now = 0.0
    text = ""
    while True:
        text += "A sentence. "
        step = pacer.step(text, 0, now)
        if step.show is None and step.wait is None:
            break
        if step.show is None:
            now += step.wait
            continue
        pacer.sent(now, now + 0.05)
        intervals.append(pacer.interval())
    assert pacer.sends == PACE.max_edits  # then nothing more until the final text
    assert intervals[0] == PACE.interval_s
    assert intervals == sorted(intervals) and intervals[-1] == PACE.max_interval_s


def test_a_slow_homeserver_gets_fewer_edits() -> None:
    pacer = Pacer(PACE)
    text = "One. Two. "
    pacer.step(text, 0, now=0.0)
    pacer.sent(0.0, 0.9)  # the post took 0.9 s (e.g. 429s retried by the gateway)
    assert pacer.step(text + "Three. ", 4, now=1.0) == Step(wait=0.8)  # twice the send time


def test_interval_zero_shows_every_piece_at_once() -> None:
    pacer = Pacer(Pace.of(StreamingSettings(edit_interval_ms=0)))
    assert pacer.step("echo", 0, now=0.0) == Step(show=4)
    pacer.sent(0.0, 0.0)
    assert pacer.step("echo", 4, now=0.0) == Step()
    assert pacer.step("echo: hi", 4, now=0.0) == Step(show=8)


def test_a_model_like_stream_first_shows_its_first_sentence_and_edits_under_once_a_second() -> None:
    """The benchmark's stream on the pacer: first words at 0.4 s, 25 words/s, 60 words;
    each send takes 85 ms and nothing is sent while one is in flight."""
    words = ("3 plus 0 is 3. To check, start at 3 and add nothing, so you stay at 3. " * 4).split()
    words = words[:60]
    arrivals = [0.4 + i / 25 for i in range(len(words))]
    send_s = 0.085
    pacer = Pacer(PACE)
    now, text, sent, posts = 0.0, "", 0, []
    i = 0
    while i < len(words):
        now = max(now, arrivals[i])
        text += words[i] + " "
        i += 1
        while True:  # look again until the pacer waits for later
            step = pacer.step(text, sent, now)
            if step.show is None:
                break
            pacer.sent(now, now + send_s)
            posts.append((now + send_s, text[: step.show]))
            sent = step.show
            now += send_s
    end = arrivals[-1] + send_s  # the final text
    first_at, first_text = posts[0]
    assert first_text == "3 plus 0 is 3."
    assert first_at <= arrivals[5] + send_s + 0.001  # when "To" confirmed the sentence's end
    edits = len(posts)  # every later partial send plus the final one is an edit
    assert edits / (end - first_at) <= 1.0
    assert all(t.endswith(".") for _, t in posts)  # every partial text ends a sentence
