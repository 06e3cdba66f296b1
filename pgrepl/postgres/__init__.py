"""PostgreSQL side of pgrepl: connections (``connect``), preflight checks (``preflight``), slots (``slot``)."""
