"""Alembic environment for the labeling database.

chatrl runs it programmatically (``chatrl.label.store.migrate``), handing over an open
connection in ``config.attributes["connection"]``. To write a new revision after changing the
models in store.py, autogenerate it against an up-to-date database:

    python -c "from alembic import command; from alembic.config import Config; \
c = Config(); c.set_main_option('script_location', 'src/chatrl/label/migrations'); \
c.set_main_option('sqlalchemy.url', 'sqlite:///labels.db'); \
command.revision(c, 'what changed', autogenerate=True)"
"""

from alembic import context

from chatrl.label.store import Base, make_engine


def run_migrations(connection) -> None:
    # Batch mode lets later revisions alter tables on SQLite (it copies the table).
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    with make_engine(context.config.get_main_option("sqlalchemy.url")).begin() as connection:
        run_migrations(connection)
