"""``GraphedForwardBackward``'s bookkeeping on CPU, with a stand-in for CUDA graphs whose replay
reruns the captured function on the captured (static) inputs, as a real replay recomputes the
captured kernels on whatever the static buffers hold. The real capture is tested on a GPU
(``test_train_cuda_graph.py``)."""

import contextlib

import pytest
import torch

from moba_cp.train import graphed_step
from moba_cp.train.graphed_step import GraphedForwardBackward


class _Graph:
    def __init__(self):
        self.fn = None
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.fn()


class _FakeCuda:
    """The parts of ``torch.cuda`` the module uses; ``graph(g)`` records what runs inside it."""

    def __init__(self):
        self.captures = 0

    Stream = staticmethod(lambda: _FakeStream())
    current_stream = staticmethod(lambda: _FakeStream())
    synchronize = staticmethod(lambda: None)
    empty_cache = staticmethod(lambda: None)
    CUDAGraph = _Graph

    @staticmethod
    @contextlib.contextmanager
    def stream(s):
        yield

    def graph(self, g, stream=None, capture_error_mode=None):
        self.captures += 1
        return _Capture(g)


class _FakeStream:
    def wait_stream(self, other):
        pass


class _Capture:
    """Runs the block once (as a capture's bookkeeping would) and makes replay run it again."""

    def __init__(self, g):
        self.g = g

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(graphed_step.torch, "cuda", fake)
    return fake


def _fb_recording(log):
    """A forward-backward stand-in: its "loss" is the batch's token sum, written into a tensor
    that outlives the call (as the captured step's outputs live in the graph's memory)."""
    out = torch.zeros(())

    def fb(batches):
        log.append([b["tokens"] for b in batches])
        out.fill_(sum(float(b["tokens"].sum()) for b in batches))
        return [{"lm loss": out}]
    return fb


def _batch(v, n=4):
    return [{"tokens": torch.full((2, n), float(v))}]


def test_warm_up_then_capture_then_replays_on_the_static_copies(fake_cuda, monkeypatch):
    g = GraphedForwardBackward(warmup=2)
    log = []
    fb = _fb_recording(log)
    # the stand-in graph: replay reruns fb on the static buffers, as kernels would recompute
    monkeypatch.setattr(g, "_capture", _capture_with(g, fb))
    assert float(g(fb, _batch(1))[0]["lm loss"]) == 8.0 and not g.captured
    assert float(g(fb, _batch(2))[0]["lm loss"]) == 16.0 and not g.captured and g.captures_next
    assert float(g(fb, _batch(3))[0]["lm loss"]) == 24.0 and g.captured  # captured, then replayed
    res = g(fb, _batch(5))
    assert float(res[0]["lm loss"]) == 40.0  # the replay saw this step's batch through the static copy
    assert log[-1][0] is g.static[0]["tokens"]  # ... and not the caller's tensor
    assert g.graph.replays == 2 and g.eager_calls == 2
    g.invalidate()
    assert not g.captured and not g.captures_next
    assert float(g(fb, _batch(7))[0]["lm loss"]) == 56.0 and g.eager_calls == 1  # eager again


def _capture_with(g, fb):
    def capture(_fb, batches):
        g.static = [{k: v.clone() for k, v in b.items()} for b in batches]
        g.result = None
        graph = _Graph()

        def run():
            g.result = fb(g.static)
        graph.fn = run
        g.graph = graph
    return capture


def test_a_step_of_another_shape_is_refused(fake_cuda, monkeypatch):
    g = GraphedForwardBackward()
    fb = _fb_recording([])
    monkeypatch.setattr(g, "_capture", _capture_with(g, fb))
    g(fb, _batch(1))
    g(fb, _batch(1))
    with pytest.raises(RuntimeError, match="differ from the captured step's .*Fix: train.cuda_graph=none"):
        g(fb, _batch(1, n=8))
    with pytest.raises(RuntimeError, match="differ from the captured step's"):
        g(fb, _batch(1) * 2)  # two micro-batches where one was captured


def test_a_failed_capture_says_why_and_starts_over(fake_cuda):
    g = GraphedForwardBackward()
    calls = []

    def fb(batches):
        calls.append(len(calls))
        if len(calls) == 2:  # the capture
            raise RuntimeError("operation not permitted when stream is capturing")
        return []
    g(fb, _batch(1))
    with pytest.raises(RuntimeError, match="capturing the training step failed \\(operation not permitted.*"
                                           "Fix: train.cuda_graph=none"):
        g(fb, _batch(1))
    assert not g.captured and g.eager_calls == 0 and fake_cuda.captures == 1


def test_warmup_must_be_positive(fake_cuda):
    with pytest.raises(ValueError, match="warmup=0; the capture needs at least one eager call"):
        GraphedForwardBackward(warmup=0)
