"""Data: SURD ingest and validation, the shapes world, the prepare stage."""
