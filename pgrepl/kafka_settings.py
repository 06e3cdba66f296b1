"""librdkafka settings: the one merge of pgrepl's defaults, the user's ``kafka_config`` and what pgrepl requires.

What pgrepl requires cannot be weakened by another spelling: librdkafka knows some settings
under two names (``delivery.timeout.ms`` is ``message.timeout.ms``), accepts topic settings
with a ``topic.`` prefix, and applies settings in order, so the last spelling wins. The merge
therefore puts the required settings last, refuses a differing value under any known spelling,
and then reads librdkafka's *effective* configuration back (through the same librdkafka the
client uses) to catch a spelling this table does not know.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from pgrepl.errors import ConfigError

log = logging.getLogger(__name__)

#: ``kafka_config`` keys about reaching and authenticating to the brokers: what a second client
#: of the same application (the consumer's dead-letter producer) shares with the first.
CONNECTION_PREFIXES = ("security.", "sasl.", "ssl.", "client.", "socket.", "broker.", "metadata.",
                       "reconnect.", "api.version", "retry.backoff", "connections.", "log.", "debug",
                       "client.dns.lookup", "resolve.")

#: librdkafka's second names for a property (CONFIGURATION.md, "Alias for ..."), by canonical name.
ALIASES: Dict[str, Tuple[str, ...]] = {
    "message.timeout.ms": ("delivery.timeout.ms",),
    "acks": ("request.required.acks",),
    "linger.ms": ("queue.buffering.max.ms",),
    "bootstrap.servers": ("metadata.broker.list",),
}

_BOOLEANS = {"1": "true", "0": "false"}
_ACKS = {"all": "-1"}


def canonical_name(key: str) -> str:
    """The property a ``kafka_config`` key sets: aliases and the ``topic.`` prefix resolved."""
    name = key[len("topic."):] if key.startswith("topic.") else key
    for canonical, aliases in ALIASES.items():
        if name in aliases:
            return canonical
    return name


def _text(value: Any) -> str:
    return str(value).strip().lower()  # True -> "true", as librdkafka prints booleans


def same_value(name: str, given: Any, wanted: Any) -> bool:
    """Whether a setting's value says the same as pgrepl's, in any spelling librdkafka accepts
    (``true``/``1``, ``acks=all``/``-1``, numbers as strings)."""
    got, want = _text(given), _text(wanted)
    if isinstance(wanted, bool):
        got = _BOOLEANS.get(got, got)
    if name == "acks":
        got, want = _ACKS.get(got, got), _ACKS.get(want, want)
    return got == want


def merge(
    user: Mapping[str, Any],
    *,
    defaults: Mapping[str, Any],
    required: Mapping[str, Any],
    required_because: str,
    refused: Optional[Mapping[str, str]] = None,
    arguments: Optional[Mapping[str, Any]] = None,
    logger: Optional[logging.Logger] = None,
) -> Dict[str, Any]:
    """``defaults``, then the user's settings, then ``required`` and ``arguments`` last.

    The user may repeat a required setting with the same value, under any spelling, but not
    change it (``ConfigError`` names the setting and ``required_because``); ``refused`` maps
    settings that may not be set at all to the reason; ``arguments`` are settings the caller took
    as constructor arguments (``bootstrap.servers``...), which ``kafka_config`` may not
    contradict. librdkafka's log lines go to ``logger`` unless the user set one.
    """
    if not isinstance(user, Mapping):
        raise ConfigError(f"kafka_config must be a mapping of librdkafka settings, got {type(user).__name__}")
    if "default.topic.config" in user:
        raise ConfigError("kafka_config may not use default.topic.config (deprecated): give its settings as "
                          "top-level keys")
    refused = refused or {}
    for key, value in user.items():
        name = canonical_name(key)
        if name in refused and not same_value(name, value, False):
            raise ConfigError(f"kafka_config may not set {key}={value!r}: {refused[name]}")
        if name in required and not same_value(name, value, required[name]):
            spelled = f" (librdkafka's other name for {name})" if name != key else ""
            raise ConfigError(f"kafka_config may not set {key}={value!r}{spelled}: pgrepl needs {name}="
                              f"{required[name]!r} ({required_because})")
        if arguments and name in arguments and value != arguments[name]:
            raise ConfigError(f"kafka_config sets {key}={value!r}, which conflicts with the argument {arguments[name]!r}")
    settings: Dict[str, Any] = dict(defaults)
    settings.update(user)
    for key, value in list(required.items()) + list((arguments or {}).items()):
        settings.pop(key, None)  # re-insert at the end: librdkafka applies settings in order
        settings[key] = value
    if logger is not None:
        settings.setdefault("logger", logger)
    # a refused setting must stay at librdkafka's default, false for every one pgrepl refuses
    check_effective(settings, {**required, **{name: False for name in refused}}, required_because)
    return settings


def check_effective(settings: Mapping[str, Any], wanted: Mapping[str, Any], because: str) -> None:
    """Read librdkafka's effective values of ``wanted`` back from ``settings``; ``ConfigError`` on a difference.

    Does nothing when librdkafka's C API cannot be reached (then the spelling table above is
    the only guard).
    """
    effective = effective_values(settings, wanted)
    if effective is None:
        return
    for name, value in wanted.items():
        got = effective.get(name)
        if got is not None and not same_value(name, got, value):
            culprits = [k for k, v in settings.items() if canonical_name(k) == name and not same_value(name, v, value)]
            culprits = culprits or ["one of kafka_config's settings"]
            raise ConfigError(f"kafka_config makes librdkafka's {name} {got} (through {', '.join(culprits)}); "
                              f"pgrepl needs {name}={value!r} ({because})")


def effective_values(settings: Mapping[str, Any], names: Iterable[str]) -> Optional[Dict[str, str]]:
    """The values librdkafka would use for ``names`` given ``settings`` (None when unavailable)."""
    lib = _librdkafka()
    if lib is None:
        return None
    conf = lib.rd_kafka_conf_new()
    error = ctypes.create_string_buffer(512)
    try:
        for key, value in settings.items():
            if isinstance(value, (str, int, float, bool)) and not callable(value):
                text = str(value).lower() if isinstance(value, bool) else str(value)
                lib.rd_kafka_conf_set(conf, key.encode(), text.encode(), error, len(error))  # errors: the client says
        out: Dict[str, str] = {}
        topic_conf = lib.rd_kafka_conf_get_default_topic_conf(conf)
        for name in names:
            buf = ctypes.create_string_buffer(1024)
            size = ctypes.c_size_t(len(buf))
            if lib.rd_kafka_conf_get(conf, name.encode(), buf, ctypes.byref(size)) != 0:
                size = ctypes.c_size_t(len(buf))
                if not topic_conf or lib.rd_kafka_topic_conf_get(topic_conf, name.encode(), buf, ctypes.byref(size)) != 0:
                    continue
            out[name] = buf.value.decode("utf-8", "replace")
        return out
    finally:
        lib.rd_kafka_conf_destroy(conf)


_LIB: Any = None


def _librdkafka() -> Any:
    """The librdkafka that confluent-kafka's C module is linked against, with the conf API typed."""
    global _LIB
    if _LIB is not None:
        return _LIB or None
    _LIB = False
    try:
        import confluent_kafka.cimpl  # noqa: F401  (loads librdkafka into the process)

        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "librdkafka" in line.rsplit("/", 1)[-1]), None)
        lib = ctypes.CDLL(path) if path else ctypes.CDLL("librdkafka.so.1")
        lib.rd_kafka_conf_new.restype = ctypes.c_void_p
        lib.rd_kafka_conf_destroy.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_conf_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                          ctypes.c_size_t]
        lib.rd_kafka_conf_get.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                          ctypes.POINTER(ctypes.c_size_t)]
        lib.rd_kafka_conf_get_default_topic_conf.restype = ctypes.c_void_p
        lib.rd_kafka_conf_get_default_topic_conf.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_topic_conf_get.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                                                ctypes.POINTER(ctypes.c_size_t)]
        _LIB = lib
    except (OSError, AttributeError, ImportError) as exc:  # no /proc (macOS), unusual builds
        log.debug("librdkafka's configuration API is not reachable (%s); checking spellings only", exc)
    return _LIB or None


def connection_settings(user: Mapping[str, Any]) -> Dict[str, Any]:
    """The part of ``kafka_config`` that says how to reach and authenticate to the brokers."""
    return {key: value for key, value in user.items() if key.startswith(CONNECTION_PREFIXES)}


def kafka_error_text(exc: BaseException) -> str:
    """The message of a ``KafkaException`` (its ``KafkaError``'s text), or of any other exception."""
    args = getattr(exc, "args", ())
    if args and hasattr(args[0], "str"):
        return str(args[0].str())
    return str(exc)
