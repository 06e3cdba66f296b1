"""kafka_config cannot weaken what the guarantees need: not directly, not through an alias, not by order."""

from __future__ import annotations

from typing import Any, Dict

import pytest

from pgrepl import ConfigError
from pgrepl import kafka_settings
from pgrepl.producer.output import producer_settings


@pytest.mark.parametrize("config, fragment", [
    ({"message.timeout.ms": 30000}, "message.timeout.ms=30000"),
    ({"delivery.timeout.ms": 30000}, "delivery.timeout.ms=30000 (librdkafka's other name for message.timeout.ms)"),
    ({"message.timeout.ms": 0, "delivery.timeout.ms": 30000}, "delivery.timeout.ms"),
    ({"topic.message.timeout.ms": 5}, "topic.message.timeout.ms"),
    ({"acks": 1}, "acks=1"),
    ({"request.required.acks": "1"}, "request.required.acks"),
    ({"topic.acks": "0"}, "topic.acks"),
    ({"enable.idempotence": False}, "enable.idempotence"),
    ({"enable.idempotence": "false"}, "enable.idempotence"),
    ({"enable.gapless.guarantee": 0}, "enable.gapless.guarantee"),
    ({"delivery.report.only.error": True}, "delivery.report.only.error"),
    ({"delivery.report.only.error": "true"}, "delivery.report.only.error"),
    ({"default.topic.config": {"acks": 1}}, "default.topic.config"),
    ({"bootstrap.servers": "elsewhere:9092"}, "conflicts with the argument"),
])
def test_weakening_settings_are_refused_with_one_line(config: Dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        producer_settings(config, "broker:9092")
    message = str(info.value)
    assert fragment in message and "\n" not in message


@pytest.mark.parametrize("config", [
    {"acks": "all"}, {"acks": -1}, {"acks": "-1"}, {"request.required.acks": "all"},
    {"enable.idempotence": "true"}, {"enable.idempotence": 1}, {"message.timeout.ms": "0"},
    {"delivery.report.only.error": False}, {"linger.ms": 20, "compression.type": "zstd"},
])
def test_equivalent_spellings_are_accepted(config: Dict[str, Any]) -> None:
    settings = producer_settings(config, "broker:9092")
    order = [key for key in settings if key != "logger"]
    assert order[-5:] == ["enable.idempotence", "acks", "enable.gapless.guarantee", "message.timeout.ms",
                          "bootstrap.servers"]  # required settings last: librdkafka applies in order


def test_required_settings_win_even_through_a_spelling_the_table_does_not_know(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the alias table emptied, the order (required settings last) still gives message.timeout.ms=0,
    as librdkafka's own read-back shows."""
    monkeypatch.setattr(kafka_settings, "ALIASES", {})
    settings = producer_settings({"message.timeout.ms": 0, "delivery.timeout.ms": 30000}, "broker:9092")
    values = kafka_settings.effective_values(settings, ["message.timeout.ms"])
    if values is None:
        pytest.skip("librdkafka's configuration API is not reachable on this platform")
    assert values == {"message.timeout.ms": "0"}


def test_the_effective_configuration_check_names_the_culprit() -> None:
    """Settings in the order the issue reported (alias last) are caught by reading librdkafka back."""
    if kafka_settings.effective_values({}, ["message.timeout.ms"]) is None:
        pytest.skip("librdkafka's configuration API is not reachable on this platform")
    with pytest.raises(ConfigError, match=r"librdkafka's message.timeout.ms 30000 \(through delivery.timeout.ms\)"):
        kafka_settings.check_effective({"message.timeout.ms": 0, "delivery.timeout.ms": 30000},
                                       {"message.timeout.ms": 0}, "the no-gap guarantee rests on it")


def test_effective_values_are_librdkafkas() -> None:
    values = kafka_settings.effective_values({"acks": "all", "delivery.timeout.ms": 1234}, ["acks", "message.timeout.ms"])
    if values is None:
        pytest.skip("librdkafka's configuration API is not reachable on this platform")
    assert values == {"acks": "-1", "message.timeout.ms": "1234"}
