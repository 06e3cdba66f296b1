"""The single source of pgrepl's version (read by setuptools and by ``pgrepl.__version__``)."""

__version__ = "0.1.0"
