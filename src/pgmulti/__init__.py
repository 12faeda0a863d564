"""pgmulti: a PostgreSQL connection pooler (PgBouncer drop-in) on uvloop with a Cython hot path."""
from .__version__ import __version__

__all__ = ["__version__"]
