"""The labeling app: annotators rank K sampled responses per prompt in the browser.

``store`` holds the database (SQLAlchemy, Alembic migrations), ``app`` the FastAPI server and
its page (``static/``), ``commands`` the ``chatrl label`` sub-commands. See docs/labeling.md.
"""

from enum import StrEnum


class ExportFormat(StrEnum):
    """rankings: data.Ranking records; pairs: TRL preference pairs; sft: rewritten replies."""

    rankings = "rankings"
    pairs = "pairs"
    sft = "sft"
