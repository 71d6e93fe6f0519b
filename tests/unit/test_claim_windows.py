"""The worker's claim windows (tasker_pg.worker.window): when a claim may pass a window, where
it starts, and when a claim reads without one."""

from __future__ import annotations

import datetime

from tasker_pg.worker import window
from tasker_pg.worker.window import ClaimWindows

WALL = 1_800_000_000.0  # a local wall-clock time (epoch seconds)


def _clocked(offset: float = 2.0, rtt: float = 0.002) -> ClaimWindows:
    windows = ClaimWindows()
    assert windows.clock_due(0.0)
    windows.set_clock(WALL, WALL + rtt / 2 + offset, WALL + rtt, now=0.0)
    assert not windows.clock_due(1.0)
    assert windows.clock_due(window.CLOCK_REFRESH)
    return windows


def _at(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC)


def test_the_first_claim_reads_without_a_window() -> None:
    assert _clocked().since("ns", 0.0) is None


def test_a_drained_claim_starts_the_window_at_its_start_less_the_margin_in_database_time() -> None:
    windows = _clocked(offset=2.0, rtt=0.002)
    windows.record("ns", windowed=False, sent_at=WALL + 5, took=0.001, drained=True, now=5.0)
    since = windows.since("ns", 5.5)
    # database time of the send, less the offset's error (half the round trip), less the margin
    assert since == _at(WALL + 5 + 2.0 - 0.001 - window.MARGIN)
    assert windows.since("other", 5.5) is None  # per namespace


def test_only_a_drained_claim_moves_the_window() -> None:
    windows = _clocked()
    windows.record("ns", windowed=False, sent_at=WALL + 5, took=0.001, drained=True, now=5.0)
    first = windows.since("ns", 5.1)
    windows.record("ns", windowed=True, sent_at=WALL + 5.2, took=0.001, drained=False, now=5.2)
    assert windows.since("ns", 5.3) == first
    windows.record("ns", windowed=True, sent_at=WALL + 5.4, took=0.001, drained=True, now=5.4)
    later = windows.since("ns", 5.5)
    assert first is not None and later is not None
    assert later - first == datetime.timedelta(seconds=0.4)


def test_claims_without_a_window_come_back_at_a_pace_set_by_their_cost() -> None:
    windows = _clocked()
    windows.record("ns", windowed=False, sent_at=WALL, took=0.001, drained=True, now=0.0)
    assert windows.since("ns", window.FULL_MIN - 0.01) is not None
    assert windows.since("ns", window.FULL_MIN) is None  # due again after FULL_MIN
    # a full claim that took 100 ms: the next after 50 x as long (5 s)
    windows.record("ns", windowed=False, sent_at=WALL + 1, took=0.1, drained=True, now=1.0)
    assert windows.since("ns", 1.0 + 4.9) is not None
    assert windows.since("ns", 1.0 + 5.0) is None
    # never rarer than FULL_MAX
    windows.record("ns", windowed=False, sent_at=WALL + 6, took=5.0, drained=True, now=6.0)
    assert windows.since("ns", 6.0 + window.FULL_MAX - 0.01) is not None
    assert windows.since("ns", 6.0 + window.FULL_MAX) is None
    # a windowed claim does not push the next full one back
    windows.record("ns", windowed=True, sent_at=WALL + 7, took=0.001, drained=True, now=7.0)
    assert windows.since("ns", 6.0 + window.FULL_MAX) is None


def test_an_untrusted_clock_or_a_lost_connection_turns_windows_off() -> None:
    windows = _clocked()
    windows.record("ns", windowed=False, sent_at=WALL, took=0.001, drained=True, now=0.0)
    assert windows.since("ns", 0.1) is not None
    windows.forget("ns")
    assert windows.since("ns", 0.1) is None
    windows.record("ns", windowed=False, sent_at=WALL, took=0.001, drained=True, now=0.0)
    # a measurement whose round trip is as long as the margin is not trusted
    windows.set_clock(WALL, WALL, WALL + window.MARGIN, now=0.2)
    assert windows.since("ns", 0.3) is None
    windows.record("ns", windowed=False, sent_at=WALL, took=0.001, drained=True, now=0.3)
    assert windows.since("ns", 0.4) is None
    # a good measurement later brings them back, after the next drained claim
    windows.set_clock(WALL, WALL + 0.001, WALL + 0.002, now=0.5)
    assert windows.since("ns", 0.6) is None
    windows.record("ns", windowed=False, sent_at=WALL, took=0.001, drained=True, now=0.6)
    assert windows.since("ns", 0.7) is not None


def test_a_claim_that_filled_its_slots_does_not_start_a_window() -> None:
    windows = _clocked()
    windows.record("ns", windowed=False, sent_at=WALL, took=0.001, drained=False, now=0.0)
    assert windows.since("ns", 0.1) is None


def test_a_full_claim_that_fills_its_slots_turns_windows_off_until_a_claim_drains() -> None:
    """Work the window cannot see (committed long after its stamp) is found by the next claim
    without a window; if that claim fills its slots, the next ones read without a window too,
    until one takes fewer than it asked for."""
    windows = _clocked()
    windows.record("ns", windowed=False, sent_at=WALL, took=0.001, drained=True, now=0.0)
    assert windows.since("ns", 0.5) is not None
    windows.record("ns", windowed=True, sent_at=WALL + 0.5, took=0.001, drained=True, now=0.5)
    # the periodic claim without a window finds a backlog
    windows.record("ns", windowed=False, sent_at=WALL + 1, took=0.001, drained=False, now=1.0)
    assert windows.since("ns", 1.1) is None
    windows.record("ns", windowed=False, sent_at=WALL + 1.1, took=0.001, drained=False, now=1.1)
    assert windows.since("ns", 1.2) is None
    windows.record("ns", windowed=False, sent_at=WALL + 1.2, took=0.001, drained=True, now=1.2)
    assert windows.since("ns", 1.3) == _at(WALL + 1.2 + 2.0 - 0.001 - window.MARGIN)


def test_before_the_clock_is_measured_no_claim_reads_with_a_window() -> None:
    windows = ClaimWindows()
    windows.record("ns", windowed=False, sent_at=WALL, took=0.001, drained=True, now=0.0)
    assert windows.since("ns", 0.5) is None


def test_forgetting_a_namespace_that_has_no_window_changes_nothing() -> None:
    """The connection may be lost on a namespace's first claim, before it has a window."""
    windows = _clocked()
    windows.forget("ns")
    assert windows.since("ns", 0.1) is None
    windows.record("ns", windowed=False, sent_at=WALL, took=0.001, drained=True, now=0.2)
    assert windows.since("ns", 0.3) == _at(WALL + 2.0 - 0.001 - window.MARGIN)


def test_a_measurement_whose_round_trip_is_just_under_the_margin_is_trusted() -> None:
    rtt = window.MARGIN * 0.9  # the offset's error, half of it, is under MARGIN / 2
    windows = _clocked(offset=2.0, rtt=rtt)
    windows.record("ns", windowed=False, sent_at=WALL + 5, took=0.001, drained=True, now=5.0)
    since = windows.since("ns", 5.5)
    assert since is not None
    expected = _at(WALL + 5 + 2.0 - rtt / 2 - window.MARGIN)
    assert abs(since - expected) <= datetime.timedelta(microseconds=1)
