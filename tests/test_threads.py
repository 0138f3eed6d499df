"""A session belongs to the thread that entered it: another thread's forwards of the same model are untouched."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

import vlmfix
from vlmfix.decoding.attention import AttentionCall
from vlmfix.decoding.edits import HeadScale
from vlmfix.decoding.method import Method

from .conftest import PlannedEdits, tiny_model

QUESTIONS = ["Describe this image.", "is there a dog in the picture ?"]
GREEDY = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True)


def run_in_thread(target) -> Any:
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            result["value"] = target()
        except BaseException as error:  # surfaced in the main thread
            result["error"] = error

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=120)
    if "error" in result:
        raise result["error"]
    return result["value"]


def assert_same(a, b) -> None:
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))


def test_plain_generate_in_another_thread_is_untouched_by_an_open_session():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    plain = tiny.model.generate(**inputs, **GREEDY)
    scale = PlannedEdits(lambda s, layer: [HeadScale(scale=torch.full((s.spans.batch_size, 4), 5.0))])
    alone = vlmfix.generate(tiny.model, **inputs, methods=[scale], **GREEDY)
    assert not torch.equal(alone.scores[0], plain.scores[0])  # the edit changes the model's output
    with vlmfix.apply(tiny.model, scale) as session:
        edited = session.generate(**inputs, **GREEDY)
        other = run_in_thread(lambda: tiny.model.generate(**inputs, **GREEDY))  # while the session is open
        again = session.generate(**inputs, **GREEDY)
    assert_same(other, plain)
    assert_same(edited, alone)
    assert_same(again, alone)


class PausesInsideItsPass(Method):
    """Test method: inside its analysis pass (its observer installed), lets another thread run a generate."""

    name = "pauses-inside-its-pass-test"
    needs_image = False

    def __init__(self, other: Any) -> None:
        self.other, self.seen_batches = other, []

    def prepare(self, session: Any) -> Any:
        def observer(call: AttentionCall) -> None:
            self.seen_batches.append(call.query.shape[0])
            if len(self.seen_batches) == 1:
                self.result = run_in_thread(self.other)  # the other thread's whole generate, mid-pass
            raise_marker = call.layer_idx == 0 and len(self.seen_batches) > 1
            if raise_marker:  # like GIFT: stop the pass early with a private exception
                raise _StopPass

        try:
            with session.observing(observer):
                session.forward(session.inputs, with_edits=False)
        except _StopPass:
            pass
        return None


class _StopPass(Exception):
    pass


def test_an_observer_mid_pass_never_sees_another_threads_forwards():
    tiny = tiny_model("llava")
    inputs = tiny.inputs(QUESTIONS)
    single = tiny.inputs(QUESTIONS[:1])
    plain = tiny.model.generate(**single, **GREEDY)
    method = PausesInsideItsPass(lambda: tiny.model.generate(**single, **GREEDY))
    vlmfix.generate(tiny.model, **inputs, methods=[method], max_new_tokens=1)
    assert_same(method.result, plain)  # no private exception and no edit leaked into the other thread
    assert set(method.seen_batches) == {2}  # only this thread's 2-row analysis pass was observed


def test_a_second_thread_cannot_open_a_session_on_the_same_model():
    tiny = tiny_model("llava")
    with vlmfix.apply(tiny.model):
        with pytest.raises(vlmfix.SessionError, match=r"already inside a vlmfix session \(opened by another "
                                                      r"thread\).*give each thread its own model copy"):
            run_in_thread(lambda: vlmfix.apply(tiny.model).__enter__())
    with pytest.raises(vlmfix.SessionError, match=r"must run on the thread that entered the session"):
        session = vlmfix.apply(tiny.model)
        with session:
            run_in_thread(lambda: session.generate(**tiny.inputs(QUESTIONS), max_new_tokens=1))
