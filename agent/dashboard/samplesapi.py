"""The labelling page's API: the gallery of stored samples, their pictures, labels given.

``GET /samples`` (the page), ``GET /api/samples?state=&device=&trigger=&model=&predicted=``,
``GET /api/samples/facets``, ``GET /api/samples/classes?model=NAME``,
``GET /api/samples/SHA256.jpg``, and ``POST /api/samples/SHA256/label`` with
``{"label": "class"}`` or ``{"label": null}`` (skip). A POST must say
``Content-Type: application/json``: a form on another site cannot send that without the
browser asking first, so a page elsewhere cannot label behind an operator's back. Who
labelled is the user name of HTTP basic auth (``token`` for a bearer token, ``local`` without
authentication). The samples themselves live with the collector (``collector.catalog``);
this module sees them through the ``SampleBook`` port.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qs

MAX_BODY = 4096
_IMAGE = re.compile(r"/api/samples/([0-9a-f]{64})\.jpg")
_LABEL = re.compile(r"/api/samples/([0-9a-f]{64})/label")
FILTERS = ("state", "device", "trigger", "model", "predicted")


class SampleBook(Protocol):
    """What the page needs of the stored samples (``collector.catalog.SampleCatalog``)."""

    def find(
        self,
        state: str = ...,
        device: str | None = ...,
        trigger: str | None = ...,
        model: str | None = ...,
        predicted: str | None = ...,
        limit: int = ...,
    ) -> list[dict[str, Any]]: ...

    def facets(self) -> dict[str, Any]: ...

    def image(self, sample: str) -> bytes | None: ...

    def classes(self, model: str) -> list[str]: ...

    def label(self, sample: str, label: str | None, by: str) -> dict[str, Any]: ...


# (status, body, content type) of an answer
Answer = tuple[HTTPStatus, bytes, str]


def _json(body: object, status: HTTPStatus = HTTPStatus.OK) -> Answer:
    return status, json.dumps(body, separators=(",", ":")).encode(), "application/json"


def _error(text: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> Answer:
    return _json({"error": text}, status)


def get(book: SampleBook | None, path: str, query: str) -> Answer | None:
    """The answer to a GET under ``/api/samples``; None for a path not of this API."""
    if not path.startswith("/api/samples"):
        return None
    if book is None:
        return _error("this collector stores no samples", HTTPStatus.NOT_FOUND)
    args = {k: v[-1] for k, v in parse_qs(query).items() if v}
    route = {
        "/api/samples": _find,
        "/api/samples/facets": lambda b, _a: _json(b.facets()),
        "/api/samples/classes": _classes,
    }.get(path)
    if route is not None:
        return route(book, args)
    match = _IMAGE.fullmatch(path)
    data = book.image(match.group(1)) if match else None
    if data is None:
        return _error("no such sample", HTTPStatus.NOT_FOUND)
    return HTTPStatus.OK, data, "image/jpeg"


def _find(book: SampleBook, args: dict[str, str]) -> Answer:
    filters = {k: args[k] for k in FILTERS if args.get(k)}
    try:
        limit = int(args.get("limit", "100"))
        return _json({"samples": book.find(**filters, limit=limit)})
    except ValueError as exc:
        return _error(str(exc))


def _classes(book: SampleBook, args: dict[str, str]) -> Answer:
    model = args.get("model")
    if not model:
        return _error("give ?model=NAME")
    return _json({"model": model, "classes": book.classes(model)})


def post(book: SampleBook | None, path: str, content_type: str, body: bytes, user: str) -> Answer:
    """The answer to a POST (only labels are posted)."""
    match = _LABEL.fullmatch(path)
    if match is None or book is None:
        return _error("not found" if match is None else "this collector stores no samples",
                      HTTPStatus.NOT_FOUND)  # fmt: skip
    if content_type.split(";", maxsplit=1)[0].strip().lower() != "application/json":
        return _error("send Content-Type: application/json", HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    label = _label_of(body)
    if isinstance(label, tuple):
        return label
    try:
        return _json(book.label(match.group(1), label, user))
    except ValueError as exc:
        return _error(str(exc), HTTPStatus.UNPROCESSABLE_ENTITY)


def _label_of(body: bytes) -> str | Answer | None:
    """The label a request gives (None: skip), or the answer that refuses it."""
    try:
        request = json.loads(body)
    except ValueError:
        return _error("the body is not JSON")
    if not isinstance(request, dict) or "label" not in request:
        return _error('send {"label": "class"} or {"label": null} to skip')
    label = request["label"]
    if label is not None and (not isinstance(label, str) or not 1 <= len(label) <= 200):
        return _error("label must be a class name (1..200 characters) or null")
    return label
