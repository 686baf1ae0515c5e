"""One decode + forward stream per core: every batch once, its own features, errors surface."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from featurepipe.cpu_streams import CoreStreams


class NumberedImages:
    """Image k is filled with the value k % 250; positions in ``bad`` fail with a reason."""

    input_size = (4, 5)
    fill_dtype = torch.uint8

    def __init__(self, bad: frozenset[int] = frozenset(), boom: int | None = None) -> None:
        self.bad, self.boom = bad, boom
        self.threads: set[str] = set()

    def decode_into(self, k: int, out: torch.Tensor) -> tuple[int, str]:
        self.threads.add(threading.current_thread().name)
        if k == self.boom:
            raise RuntimeError(f"decoder crashed on {k}")
        if k in self.bad:
            out.zero_()
            return 1000 + k, "truncated"
        out.fill_(k % 250)
        return 1000 + k, ""


def first_pixel(x: torch.Tensor, reasons: list[str]) -> np.ndarray:
    """Features of the images that decoded: their first pixel, as the engine's forward_good."""
    assert x.shape[1:] == (3, 4, 5) and x.is_contiguous(memory_format=torch.channels_last)
    good = [j for j, r in enumerate(reasons) if not r]
    return x[good, 0, 0, :1].float().numpy()


def test_every_batch_comes_back_once_with_its_own_features():
    data = NumberedImages(bad=frozenset({3, 17}))
    batches = [list(range(s, min(s + 4, 23))) for s in range(0, 23, 4)]
    seen_init = []
    got = list(CoreStreams(data, batches, first_pixel, streams=3,
                           initializer=lambda: seen_init.append(threading.current_thread().name)))
    assert sorted(idx[0] for idx, _, _ in got) == [1000 + b[0] for b in batches]
    for idx, reasons, feats in got:
        positions = [i - 1000 for i in idx]
        assert reasons == ["truncated" if k in (3, 17) else "" for k in positions]
        assert feats[:, 0].tolist() == [k for k in positions if k not in (3, 17)]
    # Every stream runs the initializer before it looks for work, and the consumer waits for
    # every stream to end, so all three ran it; which streams got batches is the scheduler's
    # choice (one may take them all on a busy machine), so only "one of them" is asserted.
    assert len(seen_init) == 3 and data.threads <= set(seen_init)


def test_no_more_streams_than_batches_and_none_for_no_work():
    data = NumberedImages()
    assert len(list(CoreStreams(data, [[0, 1]], first_pixel, streams=8))) == 1
    assert len(data.threads) == 1
    assert list(CoreStreams(data, [], first_pixel, streams=8)) == []


def test_a_stream_error_is_raised_in_the_consumer_and_every_stream_stops():
    data = NumberedImages(boom=9)
    batches = [list(range(s, s + 2)) for s in range(0, 40, 2)]
    streams: list[threading.Thread] = []  # each stream runs the initializer first
    with pytest.raises(RuntimeError, match="decoder crashed on 9"):
        list(CoreStreams(data, batches, first_pixel, streams=2,
                         initializer=lambda: streams.append(threading.current_thread())))
    assert len(streams) == 2 and not any(t.is_alive() for t in streams)


def test_closing_early_stops_the_streams_after_their_current_batch():
    """Every forward pass but the first waits for the streams' stop event, so however the
    threads are scheduled, nothing can run past a batch begun before close() stops them."""
    data = NumberedImages()
    lock, started = threading.Lock(), []
    stop_known = threading.Event()
    found: dict[str, threading.Event] = {}

    def held(x: torch.Tensor, reasons: list[str]) -> np.ndarray:
        with lock:
            started.append(len(reasons))
            first = len(started) == 1
        if not first:
            stop_known.wait()
            found["stop"].wait()  # set by close(), and by nothing else
        return first_pixel(x, reasons)

    batches = [list(range(s, s + 2)) for s in range(0, 400, 2)]
    streams: list[threading.Thread] = []
    it = iter(CoreStreams(data, batches, held, streams=2,
                          initializer=lambda: streams.append(threading.current_thread())))
    next(it)
    # The suspended generator's stop event: what close() sets to end the streams.
    found["stop"] = it.gi_frame.f_locals["stop"]
    stop_known.set()
    it.close()
    assert len(streams) == 2 and not any(t.is_alive() for t in streams)
    # The first batch, and at most the one each stream was on when close() came.
    assert len(started) in range(1, 2 + len(streams))
