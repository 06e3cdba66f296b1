"""``pgrepl slot drop NAME`` and ``pgrepl slot forget NAME``: the two ways to let a slot go.

``drop`` removes the replication slot from PostgreSQL (the WAL it kept is released; the changes
it held are lost); ``forget`` writes a tombstone for the slot's record on the slot history
topic, so that a producer accepts starting on a new slot of that name (what ``SlotLostError``
tells the user to do, accepting the gap).
"""

from __future__ import annotations

import argparse
from typing import Any, Dict

from pgrepl.cli.common import add_target_options, confirm, identify, print_json, resolve_target
from pgrepl.errors import ConfigError, PgreplError
from pgrepl.lsn import format_lsn


def add_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    slot = commands.add_parser("slot", help="drop a replication slot, or forget its history")
    actions = slot.add_subparsers(dest="action", required=True)
    drop = actions.add_parser("drop", help="drop a logical replication slot (asks first; --yes for scripts)")
    drop.add_argument("name", help="the slot")
    drop.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    add_target_options(drop, kafka=False)
    drop.set_defaults(run=run_drop)
    forget = actions.add_parser("forget", help="delete the slot's record from the slot history topic (a tombstone)")
    forget.add_argument("name", help="the slot")
    forget.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    add_target_options(forget, kafka=True)
    forget.set_defaults(run=run_forget)


def _done(args: argparse.Namespace, result: Dict[str, Any], text: str) -> int:
    if args.json:
        print_json(result)
    else:
        print(text)
    return 0


def run_drop(args: argparse.Namespace) -> int:
    from pgrepl.postgres.connect import connect
    from pgrepl.postgres.slot import get_slot, validate_slot_name

    validate_slot_name(args.name)
    target = resolve_target(args)
    assert target.dsn is not None
    conn = connect(target.dsn, application_name="pgrepl/cli")
    try:
        info = get_slot(conn, args.name)
        if info is None:
            raise ConfigError(f"replication slot {args.name} does not exist on this server")
        if info.active_pid is not None:
            raise PgreplError(f"replication slot {args.name} is in use by walsender pid {info.active_pid}; "
                              "stop the producer streaming from it first")
        where = f"confirmed up to {format_lsn(info.confirmed_flush_lsn)}" if info.confirmed_flush_lsn else "unused"
        if not confirm(f"Drop replication slot {args.name} ({where})? Changes not yet in Kafka are lost", args.yes):
            print("not dropped")
            return 1
        with conn.cursor() as cur:
            cur.execute("SELECT pg_drop_replication_slot(%s)", (args.name,))
    finally:
        conn.close()
    return _done(args, {"slot": args.name, "dropped": True},
                 f"dropped replication slot {args.name}; a producer configured for it stops with SlotLostError "
                 f"until you run: pgrepl slot forget {args.name} --config FILE")


def run_forget(args: argparse.Namespace) -> int:
    from pgrepl.postgres.connect import connect
    from pgrepl.postgres.slot import get_slot, validate_slot_name
    from pgrepl.producer.history import SlotHistory, history_key
    from pgrepl.producer.output import producer_settings

    validate_slot_name(args.name)
    target = resolve_target(args)
    assert target.dsn is not None
    if not target.brokers:
        raise ConfigError("pgrepl slot forget needs Kafka: --config FILE (the producer's) or --brokers")
    system_identifier, database = identify(target.dsn)
    conn = connect(target.dsn, application_name="pgrepl/cli")
    try:
        info = get_slot(conn, args.name)
    finally:
        conn.close()
    if info is not None and info.active_pid is not None:
        raise PgreplError(f"replication slot {args.name} is streaming (walsender pid {info.active_pid}); its producer "
                          "would write the record again: stop it first")
    key = history_key(system_identifier, database, args.name)
    from confluent_kafka import Producer as KafkaProducer

    history = SlotHistory(None, target.brokers, target.kafka, target.history_topic)
    record = history.load(key)
    if record is None:
        return _done(args, {"slot": args.name, "forgotten": False},
                     f"slot {args.name} of database {database} has no record on {target.history_topic}: nothing to forget")
    if not confirm(f"Forget slot {args.name} (last confirmed {format_lsn(record.confirmed_lsn)})? The next "
                   "producer starts on a new slot at the current WAL position", args.yes):
        print("not forgotten")
        return 1
    history.client = KafkaProducer(producer_settings(target.kafka, target.brokers))
    history.forget(key)
    return _done(args, {"slot": args.name, "forgotten": True, "last_confirmed_lsn": format_lsn(record.confirmed_lsn)},
                 f"forgot slot {args.name} (last confirmed {format_lsn(record.confirmed_lsn)}) on "
                 f"{target.history_topic}; the next producer for it starts afresh")
