"""featstore: extract features once into an LMDB + Parquet store, query them with DuckDB."""

__version__ = "0.1.0"
