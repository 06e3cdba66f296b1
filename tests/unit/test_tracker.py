"""DeliveryTracker: the slot moves only over fully delivered batches, in order."""

from __future__ import annotations

from pgrepl.producer.delivery import DeliveryTracker


class Msg:
    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return 3


def test_prefix_of_delivered_batches_sets_the_position() -> None:
    tracker = DeliveryTracker(100)
    first = tracker.track(2, 200)
    second = tracker.track(1, 300)
    third = tracker.track(1, None)  # a batch inside an open transaction
    assert first and second and third
    second.on_delivery(None, Msg())
    assert tracker.confirmable() == 100  # the earlier batch is not delivered yet
    first.on_delivery(None, Msg())
    assert tracker.confirmable() == 100
    first.on_delivery(None, Msg())
    assert tracker.confirmable() == 300
    assert tracker.in_flight == 1
    third.on_delivery(None, Msg())
    assert tracker.confirmable() == 300 and tracker.in_flight == 0


def test_idle_position_only_when_nothing_is_in_flight() -> None:
    tracker = DeliveryTracker(100)
    pending = tracker.track(1, 200)
    assert tracker.confirmable(idle_position=500) == 100
    assert pending is not None
    pending.on_delivery(None, Msg())
    assert tracker.confirmable(idle_position=500) == 500
    assert tracker.confirmable(idle_position=400) == 500  # never goes back


def test_commit_only_batches_with_nothing_in_flight_move_at_once() -> None:
    tracker = DeliveryTracker(100)
    assert tracker.track(0, 150) is None
    assert tracker.confirmable() == 150


def test_a_failed_delivery_blocks_the_position_and_is_reported() -> None:
    tracker = DeliveryTracker(100)
    failed = tracker.track(1, 200)
    later = tracker.track(1, 300)
    assert failed and later
    later.on_delivery(None, Msg())
    failed.on_delivery("BROKER_DOWN", Msg())
    assert tracker.confirmable(idle_position=900) == 100
    assert tracker.failure == "delivery to t[3] failed: BROKER_DOWN"


def test_an_abandoned_batch_waits_only_for_what_was_produced_and_never_moves_the_slot() -> None:
    tracker = DeliveryTracker(100)
    done = tracker.track(1, 200)
    cut = tracker.track(3, 300)
    assert done and cut
    cut.abandon(2)  # one of its three markers was produced before the stop
    done.on_delivery(None, Msg())
    cut.on_delivery(None, Msg())
    assert tracker.confirmable(idle_position=900) == 200  # neither its commit nor the keepalive
    assert tracker.in_flight == 0
