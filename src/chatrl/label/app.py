"""The labeling server: the annotator's page and the JSON API behind it.

Only the page itself (``/`` and ``/static/…``, which hold no data) is public. Every API call
needs ``Authorization: Bearer TOKEN``: a missing or unknown token gets 401, someone else's
assignment 404, an annotator calling an admin endpoint 403. Admin endpoints (statistics,
export) need an admin token (``chatrl label add-annotator NAME --admin``); importing tasks and
adding annotators are CLI-only.
"""

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict

from chatrl.label import ExportFormat
from chatrl.label.store import (
    AlreadySubmitted,
    Annotator,
    Assignment,
    AssignmentNotFound,
    InvalidSubmission,
    LabelStore,
    Progress,
    Submission,
    export_records,
)

STATIC = Path(__file__).parent / "static"
# No inline scripts or styles anywhere: even if some text slipped through unescaped, the
# browser would refuse to run it.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class SubmissionBody(BaseModel):
    """A ranking of the shown responses (indices, best first), optional flags and rewrite."""

    model_config = ConfigDict(extra="forbid")

    ranking: list[int]
    flags: dict[str, list[int]] = {}
    rewrite: str | None = None


def _assignment_json(assignment: Assignment) -> dict[str, Any]:
    # Never the task's meta: it can hold the answers of the bundled world's judge.
    return {
        "id": assignment.id,
        "prompt": assignment.prompt,
        "responses": assignment.responses,
        "submitted": assignment.submitted,
    }


def _progress_json(progress: Progress) -> dict[str, int]:
    return {"done": progress.done, "remaining": progress.remaining}


def create_app(store: LabelStore) -> FastAPI:
    """The FastAPI app serving the labeling page and API on top of ``store``."""
    app = FastAPI(title="chatrl labeling", docs_url=None, redoc_url=None, openapi_url=None)
    bearer = HTTPBearer(auto_error=False)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def annotator(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Annotator:
        if credentials is None:
            raise HTTPException(401, "log in: missing token", {"WWW-Authenticate": "Bearer"})
        who = store.authenticate(credentials.credentials)
        if who is None:
            raise HTTPException(401, "unknown token", {"WWW-Authenticate": "Bearer"})
        return who

    def admin(who: Annotated[Annotator, Depends(annotator)]) -> Annotator:
        if not who.is_admin:
            raise HTTPException(403, "admin token needed")
        return who

    Me = Annotated[Annotator, Depends(annotator)]
    Admin = Annotated[Annotator, Depends(admin)]

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/me")
    def me(who: Me) -> dict[str, Any]:
        return {"name": who.name, "admin": who.is_admin}

    @app.get("/api/next")
    def next_task(who: Me) -> dict[str, Any]:
        assignment = store.next_assignment(who.id)
        return {
            "assignment": None if assignment is None else _assignment_json(assignment),
            "progress": _progress_json(store.progress(who.id)),
        }

    @app.get("/api/assignments/{assignment_id}")
    def get_assignment(assignment_id: int, who: Me) -> dict[str, Any]:
        try:
            return _assignment_json(store.get_assignment(who.id, assignment_id))
        except AssignmentNotFound as e:
            raise HTTPException(404, str(e)) from None

    @app.post("/api/assignments/{assignment_id}")
    def submit(assignment_id: int, body: SubmissionBody, who: Me) -> dict[str, Any]:
        submission = Submission(body.ranking, body.flags, body.rewrite)
        try:
            stored = store.submit(who.id, assignment_id, submission)
        except AssignmentNotFound as e:
            raise HTTPException(404, str(e)) from None
        except InvalidSubmission as e:
            raise HTTPException(422, str(e)) from None
        except AlreadySubmitted as e:
            raise HTTPException(409, str(e)) from None
        return {
            "status": "stored" if stored else "already stored",
            "progress": _progress_json(store.progress(who.id)),
        }

    @app.get("/api/admin/stats")
    def stats(_: Admin) -> JSONResponse:
        return JSONResponse(store.stats())

    @app.get("/api/admin/export")
    def export(
        _: Admin, fmt: Annotated[ExportFormat, Query(alias="format")] = ExportFormat.rankings
    ) -> Response:
        lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in export_records(store, fmt))
        return Response("".join(lines), media_type="application/x-ndjson")

    return app
