"""The pure-Python baseline: decoder (``struct`` + ``json``) and producer (psycopg2 ``read_message``)."""
