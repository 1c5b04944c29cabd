"""Persistence: the database handle, table mappings, repository functions, migrations."""
