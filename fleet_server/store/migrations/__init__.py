"""Alembic migrations of the fleet database (run by ``fleet_server.store.migrate``)."""
