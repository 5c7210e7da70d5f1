"""The labeling page: a small FastAPI app over a flywheel directory's label store (``cleanplate label serve``).

``GET /`` is one static HTML page (``label_page.html``: no build step, no CDN, nothing fetched from outside)
that shows source, mask and result side by side; keys ``Y`` yes, ``N`` no, ``S``/``→`` skip,
``U``/``←``/``Backspace`` undo, ``E`` export. The labeler's name comes from ``?labeler=NAME``, the server's
``--labeler`` or the name field (kept in the browser's localStorage).

API (JSON; errors are ``application/problem+json`` with a ``code``):

* ``GET /api/config`` -> ``{"labeler", "rounds", "policy", "export_path"}``
* ``GET /api/next?labeler=NAME`` -> ``{"item": ITEM | null, "progress": PROGRESS}``: the next item NAME has
  not labeled (candidate order); null when none is left.
* ``GET /api/items/{id}`` -> ITEM
* ``POST /api/label`` ``{"item_id", "label": "yes"|"no"|"skip", "labeler"}`` -> ``{"label", "progress"}``
* ``POST /api/undo`` ``{"labeler"}`` -> ``{"undone": LABEL | null, "progress"}`` (deletes NAME's newest label)
* ``GET /api/export[?policy=majority|latest&min_votes=1]`` -> the export as a JSON list (paths relative
  to the flywheel directory), sent as ``meta.json``
* ``POST /api/export`` ``{"policy"?, "min_votes"?}`` -> writes it to the server's export path (default
  ``DIR/labels_meta.json``, paths relative to that file) and answers ``{"path", "counts"}``
* ``GET /files/{id}/{source|mask|result}`` -> the PNG; ``GET /healthz``, ``GET /readyz``.

ITEM = ``{"id", "round", "urls": {"source", "mask", "result"}}`` (the generating score is not shown, so it
cannot sway the person). PROGRESS = :meth:`LabelStore.progress`.
The server binds 127.0.0.1 by default and has no authentication: it is for people on this machine (or
behind an SSH tunnel).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, Field

from cleanplate.errors import CleanplateError, ErrorCode, InputError

from .label_store import POLICIES, Item, LabelStore, check_labeler, label_dict

PAGE = Path(__file__).with_name("label_page.html")
EXPORT_NAME = "labels_meta.json"


class LabelBody(BaseModel):
    item_id: str
    label: str
    labeler: str


class UndoBody(BaseModel):
    labeler: str


class ExportBody(BaseModel):
    policy: str | None = None
    min_votes: int = Field(1, ge=1)


def create_app(directory: str | os.PathLike, *, labeler: str | None = None, rounds: Sequence[int] | None = None,
               policy: str = "majority", export_path: str | os.PathLike | None = None) -> Any:
    """The labeling app for flywheel directory ``directory`` (its ``candidates.jsonl`` is synced into the
    store now and whenever it changes).

    Args:
        labeler: default labeler name for the page (None: the page asks).
        rounds: only items of these rounds (None: all).
        policy: default export policy ("majority" or "latest").
        export_path: where ``POST /api/export`` writes (default ``DIR/labels_meta.json``).
    Raises:
        InputError: the directory does not exist, a bad labeler name or policy.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    store = LabelStore(directory)
    store.sync()
    if labeler is not None:
        labeler = check_labeler(labeler)
    if policy not in POLICIES:
        raise InputError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}", code=ErrorCode.BAD_OPTION)
    round_list = [int(r) for r in rounds] if rounds else None
    out_path = Path(export_path) if export_path is not None else store.dir / EXPORT_NAME

    app = FastAPI(title="cleanplate labels", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(CleanplateError)
    async def _problem(request: Request, exc: CleanplateError) -> JSONResponse:
        status = exc.code.http_status
        return JSONResponse({"type": "about:blank", "title": exc.code.value, "status": status, "detail": str(exc),
                             "code": exc.code.value}, status_code=status, media_type="application/problem+json")

    def item_json(item: Item) -> dict[str, Any]:
        return {"id": item.id, "round": item.round,
                "urls": {k: f"/files/{item.id}/{k}" for k in ("source", "mask", "result")}}

    def progress(name: str) -> dict[str, int]:
        return store.progress(name, round_list)

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(), headers={"Cache-Control": "no-store"})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/api/config")
    def config() -> dict[str, Any]:
        return {"labeler": labeler, "rounds": round_list, "policy": policy, "export_path": str(out_path)}

    @app.get("/api/next")
    def next_item(labeler: str) -> dict[str, Any]:
        store.sync()
        name = check_labeler(labeler)
        item = store.next_item(name, round_list)
        return {"item": None if item is None else item_json(item), "progress": progress(name)}

    def get_item(item_id: str) -> Item:
        item = store.item(item_id)
        if item is None:
            raise InputError(f"no item {item_id!r}", code=ErrorCode.UNKNOWN_ITEM)
        return item

    @app.get("/api/items/{item_id}")
    def one_item(item_id: str) -> dict[str, Any]:
        return item_json(get_item(item_id))

    @app.post("/api/label")
    def add_label(body: LabelBody) -> dict[str, Any]:
        lab = store.add_label(body.item_id, body.label, body.labeler)
        return {"label": label_dict(lab), "progress": progress(lab.labeler)}

    @app.post("/api/undo")
    def undo(body: UndoBody) -> dict[str, Any]:
        name = check_labeler(body.labeler)
        lab = store.undo(name)
        return {"undone": None if lab is None else label_dict(lab), "progress": progress(name)}

    @app.get("/api/export")
    def export_get(policy: str = policy, min_votes: int = 1) -> JSONResponse:
        store.sync()
        entries, _ = store.export_entries(store.dir, policy, min_votes=min_votes,  # type: ignore[arg-type]
                                          rounds=round_list)
        return JSONResponse(entries, headers={"Content-Disposition": 'attachment; filename="meta.json"'})

    @app.post("/api/export")
    def export_post(body: ExportBody) -> dict[str, Any]:
        counts = store.export(out_path, body.policy or policy, min_votes=body.min_votes,  # type: ignore[arg-type]
                              rounds=round_list)
        return {"path": str(out_path), "counts": counts}

    @app.get("/files/{item_id}/{kind}")
    def file(item_id: str, kind: str) -> FileResponse:
        if kind not in ("source", "mask", "result"):
            raise InputError(f"kind must be source, mask or result, got {kind!r}", code=ErrorCode.UNKNOWN_ITEM)
        item = get_item(item_id)
        return FileResponse(store.dir / getattr(item, kind), media_type="image/png",
                            headers={"Cache-Control": "no-store"})

    return app


def serve(directory: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8090, labeler: str | None = None,
          rounds: Sequence[int] | None = None, policy: str = "majority",
          export_path: str | os.PathLike | None = None, log_level: str = "warning",
          announce: Callable[[str], None] | None = None) -> None:
    """Run :func:`create_app` under uvicorn until interrupted; ``announce`` gets the page's URL once the app
    is built (so a bad directory fails before anything is announced)."""
    import uvicorn

    app = create_app(directory, labeler=labeler, rounds=rounds, policy=policy, export_path=export_path)
    if announce is not None:
        announce(f"http://{host}:{port}/" + (f"?labeler={quote(labeler)}" if labeler else ""))
    uvicorn.run(app, host=host, port=port, log_level=log_level)
