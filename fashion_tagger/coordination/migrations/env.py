"""Alembic's entry point for the coordination schema: runs the migrations on the connection that
`fashion_tagger.coordination.migrate` opened (and locked) and passed in `config.attributes["connection"]`."""

from __future__ import annotations

from alembic import context

from fashion_tagger.coordination.schema import VERSION_TABLE, metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters a table by copying it
)
with context.begin_transaction():
    context.run_migrations()
