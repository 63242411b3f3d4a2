"""The per-request tracker without models: text deltas, the marking of draft tokens, stop sequences
held back across steps, and the reasons a generation ends."""

import types

import pytest
import torch

from tiny_llava import tiny_tokenizer

from specllava.serve.engine import Job, _Tracker
from specllava.serve.protocol import ChatRequest

TOK = tiny_tokenizer()  # one token per byte


class _Events(list):
    put_nowait = list.append


def tracker(stop=(), deadline=1e18):
    loop = types.SimpleNamespace(call_soon_threadsafe=lambda f, *a: f(*a))
    req = ChatRequest(conversation=[], max_tokens=None, temperature=0, top_p=1, top_k=0, seed=None,
                      stop=list(stop))
    job = Job(req, {"input_ids": torch.zeros(1, 3, dtype=torch.long)}, 50, loop, deadline, events=_Events())
    return _Tracker(job, TOK, {TOK.convert_tokens_to_ids("<|im_end|>")}, "dynamic"), job


def ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def step(tr, text, accepted):
    """One verification step that emits `text`, the first `accepted` tokens from the draft."""
    tree = [0] * (accepted + 3)  # only its length (root + draft nodes) is read
    tr.on_step(tree, types.SimpleNamespace(path=[0] * (accepted + 1)))
    tr.add(ids(text))


def test_deltas_pieces_and_stats():
    tr, job = tracker()
    tr.add(ids("H"))  # the prefill's token
    step(tr, "ello", 3)
    step(tr, " you", 0)
    out = tr.finish()
    assert "".join(e["text"] for e in job.events if e["type"] == "delta") == out["text"] == "Hello you"
    pieces = [p for e in job.events for p in e["pieces"]]
    assert pieces == [["H", False, 0], ["e", True, 1], ["l", True, 1], ["l", True, 1], ["o", False, 1],
                      [" ", False, 2], ["y", False, 2], ["o", False, 2], ["u", False, 2]]
    s = out["stats"]
    assert (s["steps"], s["target_forwards"], s["draft_tokens_accepted"], s["accept_hist"]) == (2, 3, 3, [1, 0, 0, 1])
    assert s["draft_tokens_proposed"] == 5 + 2
    assert s["mean_accepted_length"] == 9 / 3 and out["finish_reason"] == "length" and s["stopped_by"] == "max_tokens"


def test_stop_sequence_split_across_steps_is_held_back_and_cut():
    tr, job = tracker(stop=["END"])
    tr.add(ids("a"))
    step(tr, "bcE", 2)  # "E" may start "END": held back
    assert "".join(e["text"] for e in job.events) == "abc" and tr.stop_reason() is None
    step(tr, "NDxyz", 4)
    assert tr.stop_reason() == "stop"
    tr.stopped = "stop"
    out = tr.finish()
    assert "".join(e["text"] for e in job.events if e["type"] == "delta") == out["text"] == "abc"
    assert out["finish_reason"] == "stop" and out["stats"]["stopped_by"] == "stop_sequence"


def test_a_held_back_tail_that_is_no_stop_goes_out_at_the_end():
    tr, job = tracker(stop=["END"])
    tr.add(ids("abcEN"))
    out = tr.finish()
    assert "".join(e["text"] for e in job.events) == out["text"] == "abcEN"


def test_eos_cancel_and_time_limit():
    tr, _ = tracker()
    tr.add(ids("ok") + [TOK.convert_tokens_to_ids("<|im_end|>")])
    out = tr.finish()
    assert out["text"] == "ok" and out["finish_reason"] == "stop" and out["stats"]["stopped_by"] == "eos"

    tr, job = tracker()
    tr.add(ids("a"))
    job.cancelled.set()
    assert tr.stop_reason() == "cancelled"

    tr, _ = tracker(deadline=0.0)
    tr.add(ids("a"))
    assert tr.stop_reason() == "time_limit"
