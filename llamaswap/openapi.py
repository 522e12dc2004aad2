"""The OpenAPI 3 description of every endpoint llamaswap serves (``/openapi.json``)."""

from __future__ import annotations

import re
from typing import Any

from . import __version__
from .routes import MODEL_ROUTES, Body, ModelRoute


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


def _text(description: str, media: str = "text/plain") -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


MODEL_ERRORS = {
    "400": _error(
        "Malformed body, or no model named while none (or several) are loaded and no "
        "`defaultModel` is set; the message lists the valid ids"
    ),
    "404": _error("Unknown model; the message lists the valid ids"),
    "429": _error("The model has `concurrencyLimit` requests already (see Retry-After)"),
    "502": _error("The model's server (or peer) could not be reached"),
    "503": _error("The model failed to start, timed out, or the queue is full"),
}

_ROUTED = (
    "Routed to a model like the OpenAI routes: the JSON body's `model` (or a multipart "
    "form's `model` field), else `?model=`, else `defaultModel`, else the one model that "
    "is loaded. Starts the model if needed, then relays the request and streams the "
    "response back unchanged."
)
_OPAQUE = (
    "The body is relayed as it came (it need not be a JSON object); the model comes "
    "from `?model=` (or a JSON object's `model`), else `defaultModel`, else the one "
    "model that is loaded."
)


def _model_request_body(route: ModelRoute) -> dict[str, Any]:
    if route.body is Body.OPAQUE:
        return {"required": False, "content": {"*/*": {"schema": {}}}}
    form = {"schema": {"type": "object", "properties": {"model": {"type": "string"}}}}
    return {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ModelRequest"}},
            "multipart/form-data": form,
        },
    }


def _model_path(route: ModelRoute) -> dict[str, Any]:
    """Every method of one route of the table; OPTIONS answers 204 with ``Allow``."""
    parameters: list[dict[str, Any]] = [
        {"name": "model", "in": "query", "required": False, "schema": {"type": "string"}}
    ]
    parameters += [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"\{(\w+)\}", route.path)
    ]
    responses = {
        "200": {
            "description": "The model's own response (JSON or an event stream)",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        },
        **MODEL_ERRORS,
    }
    operations: dict[str, Any] = {}
    for method in route.methods:
        operation: dict[str, Any] = {
            "tags": [route.tag],
            "summary": route.summary,
            "description": _OPAQUE if route.body is Body.OPAQUE else _ROUTED,
            "parameters": parameters,
            "responses": responses,
        }
        if method == "POST":
            operation["requestBody"] = _model_request_body(route)
        operations[method.lower()] = operation
    operations["options"] = {
        "tags": [route.tag],
        "parameters": parameters,
        "summary": "The route's methods (CORS preflights: see the CORS setting)",
        "responses": {"204": {"description": "No body; `Allow` lists the methods"}},
    }
    return operations


def _model_param(where: str = "path") -> dict[str, Any]:
    return {"name": "model", "in": where, "required": True, "schema": {"type": "string"}}


def _management() -> dict[str, Any]:
    ok = _json("Done", {"type": "object", "properties": {"msg": {"type": "string"}}})
    stream = _text("History (unless `?no-history`), then live lines")
    no_history = {
        "name": "no-history",
        "in": "query",
        "required": False,
        "allowEmptyValue": True,
        "schema": {"type": "string"},
    }
    number = {"type": "number"}

    def query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema}

    tags = {"tags": ["Management"]}
    return {
        "/v1/models": {
            "get": {
                **tags,
                "summary": "Models (OpenAI list)",
                "responses": {"200": _json("Model list")},
            }
        },
        "/models": {
            "get": {
                **tags,
                "summary": "Models (same as /v1/models)",
                "responses": {"200": _json("Model list")},
            }
        },
        "/running": {
            "get": {
                **tags,
                "summary": "Running models and their details",
                "responses": {"200": _json("Running models")},
            }
        },
        "/health": {
            "get": {**tags, "summary": "llamaswap is up", "responses": {"200": _text("OK")}}
        },
        "/v1/health": {
            "get": {
                **tags,
                "summary": "llamaswap is up, in llama-server's shape; asks no model",
                "responses": {"200": _json('`{"status": "ok"}`')},
            }
        },
        "/unload": {
            "get": {**tags, "summary": "Stop every model", "responses": {"200": _text("OK")}}
        },
        "/api/models/unload": {
            "post": {**tags, "summary": "Stop every model", "responses": {"200": ok}}
        },
        "/api/models/unload/{model}": {
            "post": {
                **tags,
                "summary": "Stop one model",
                "parameters": [_model_param()],
                "responses": {"200": ok, "404": _error("Unknown model")},
            }
        },
        "/api/models/load/{model}": {
            "post": {
                **tags,
                "summary": "Start a model; answers when it is ready",
                "parameters": [_model_param()],
                "responses": {
                    "200": ok,
                    "404": _error("Unknown model"),
                    "503": _error("The model failed to start"),
                },
            }
        },
        "/upstream/{model}/{path}": {
            method: {
                **tags,
                "summary": "Raw pass-through to a model's server (starts it if needed)",
                "parameters": [
                    _model_param(),
                    {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "The server's own response"}, **MODEL_ERRORS},
            }
            for method in ("get", "post", "put", "patch", "delete")
        },
        "/logs": {
            "get": {
                **tags,
                "summary": "Recent log history",
                "responses": {
                    "200": _text("Log lines"),
                    "302": {"description": "Browsers go to /ui/#logs"},
                },
            }
        },
        "/logs/stream": {
            "get": {
                **tags,
                "summary": "Live log stream (all sources)",
                "parameters": [no_history],
                "responses": {"200": stream},
            }
        },
        "/logs/stream/{source}": {
            "get": {
                **tags,
                "summary": "Live log stream of `proxy`, `upstream` or one model",
                "parameters": [
                    {
                        "name": "source",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                    no_history,
                ],
                "responses": {"200": stream, "404": _error("Unknown model")},
            }
        },
        "/metrics": {
            "get": {
                "tags": ["Observability"],
                "summary": "Prometheus metrics",
                "description": "llamaswap's own, then each running model's own metrics "
                "(llama-server with --metrics), every sample labelled with its model.",
                "responses": {"200": _text("Prometheus text format")},
            }
        },
        "/api/activity": {
            "get": {
                "tags": ["Observability"],
                "summary": "One row per proxied request, newest first",
                "parameters": [
                    query("model", {"type": "string"}),
                    query("since", number),
                    query("until", number),
                    query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                    query("offset", {"type": "integer", "minimum": 0}),
                ],
                "responses": {
                    "200": _json("Rows and total"),
                    "400": _error("Bad parameter"),
                    "503": _error("The activity log cannot be written now"),
                },
            }
        },
        "/api/activity/stats": {
            "get": {
                "tags": ["Observability"],
                "summary": "Per model: totals and p50/p95/p99 of latency and speeds",
                "parameters": [query("since", number), query("until", number)],
                "responses": {
                    "200": _json("Statistics and the store's health"),
                    "503": _error("The activity log cannot be written now"),
                },
            }
        },
        "/api/events": {
            "get": {
                "tags": ["Observability"],
                "summary": "Live events: model, log, activity, queue, swap",
                "responses": {"200": _text("Server-sent events", "text/event-stream")},
            }
        },
        "/api/version": {
            "get": {**tags, "summary": "Version", "responses": {"200": _json("Version")}}
        },
        "/openapi.json": {
            "get": {
                "tags": ["Documentation"],
                "summary": "This document",
                "responses": {"200": _json("OpenAPI 3 document")},
            }
        },
        "/swagger/": {
            "get": {
                "tags": ["Documentation"],
                "summary": "Interactive API documentation",
                "responses": {"200": _text("HTML", "text/html")},
            }
        },
        "/ui/": {
            "get": {
                "tags": ["Documentation"],
                "summary": "Web UI",
                "responses": {"200": _text("HTML", "text/html")},
            }
        },
    }


def openapi_document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in MODEL_ROUTES:
        paths[route.path] = _model_path(route)
    paths.update(_management())
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "llamaswap",
            "version": __version__,
            "description": "One OpenAI-compatible endpoint for many models, started and "
            "swapped on demand.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["message", "type", "code"],
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "code": {"type": "string"},
                            },
                        }
                    },
                },
                "ModelRequest": {
                    "type": "object",
                    "properties": {
                        "model": {
                            "type": "string",
                            "description": "Model id, alias, variant or profile:model; "
                            "without it: defaultModel, else the one loaded model",
                        },
                        "stream": {"type": "boolean"},
                    },
                    "additionalProperties": True,
                },
            }
        },
    }
