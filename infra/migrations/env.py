"""Alembic environment: migrations are plain SQL, run against DATABASE_URL."""

from alembic import context
from sqlalchemy import create_engine

url = context.config.get_main_option("sqlalchemy.url") or ""
connectable = create_engine(url)
with connectable.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
connectable.dispose()
