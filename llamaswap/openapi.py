"""The OpenAPI 3 description of every endpoint llamaswap serves (``/openapi.json``),
built from the route tables of ``routes.py``: nothing here lists a route."""

from __future__ import annotations

from typing import Any

from . import __version__
from .routes import (
    API_ROUTES,
    MODEL_ERRORS,
    MODEL_ROUTES,
    Answer,
    ApiRoute,
    Body,
    Media,
    ModelRoute,
    Param,
)

#: what a request that needs a key may carry (when ``apiKeys`` is set)
KEY_NEEDED: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}, {"basic": []}]
OPEN: list[dict[str, list[str]]] = []


def _answer(answer: Answer) -> dict[str, Any]:
    """One entry of an operation's ``responses``."""
    described: dict[str, Any] = {"description": answer.description}
    if answer.media is Media.ERROR:
        schema: dict[str, Any] = {"$ref": "#/components/schemas/Error"}
        described["content"] = {"application/json": {"schema": schema}}
    elif answer.media is Media.JSON:
        schema = dict(answer.schema or {"type": "object"})
        described["content"] = {"application/json": {"schema": schema}}
    elif answer.media in (Media.TEXT, Media.HTML, Media.EVENTS):
        described["content"] = {answer.media.value: {"schema": {"type": "string"}}}
    return described


def _answers(answers: tuple[Answer, ...]) -> dict[str, Any]:
    return {str(answer.status): _answer(answer) for answer in answers}


def _parameter(param: Param) -> dict[str, Any]:
    described: dict[str, Any] = {
        "name": param.name,
        "in": param.where,
        "required": param.required,
        "schema": dict(param.schema),
    }
    if param.flag:
        described["allowEmptyValue"] = True
    return described


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
    parameters = [_parameter(Param("model"))]
    parameters += [_parameter(Param(name, "path")) for name in route.path_parameters]
    responses = {
        "200": {
            "description": "The model's own response (JSON or an event stream)",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        },
        **_answers(MODEL_ERRORS),
    }
    operations: dict[str, Any] = {}
    for method in route.methods:
        operation: dict[str, Any] = {
            "tags": [route.tag],
            "summary": route.summary,
            "description": _OPAQUE if route.body is Body.OPAQUE else _ROUTED,
            "parameters": parameters,
            "responses": responses,
            "security": KEY_NEEDED,
        }
        if method == "POST":
            operation["requestBody"] = _model_request_body(route)
        operations[method.lower()] = operation
    operations["options"] = {
        "tags": [route.tag],
        "parameters": parameters,
        "summary": "The route's methods (CORS preflights: see the CORS setting)",
        "responses": {"204": {"description": "No body; `Allow` lists the methods"}},
        "security": KEY_NEEDED,
    }
    return operations


def _api_path(route: ApiRoute) -> dict[str, Any]:
    """Every method of one route llamaswap answers itself."""
    operation: dict[str, Any] = {
        "tags": [route.tag],
        "summary": route.summary,
        "responses": _answers(route.answers),
        "security": OPEN if route.open or route.session else KEY_NEEDED,
    }
    if route.description:
        operation["description"] = route.description
    if route.parameters:
        operation["parameters"] = [_parameter(p) for p in route.parameters]
    return {method.lower(): operation for method in route.methods}


def openapi_document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in MODEL_ROUTES:
        paths[route.path] = _model_path(route)
    for api_route in API_ROUTES:
        if api_route.documented:
            paths[api_route.path] = _api_path(api_route)
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
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "One of `apiKeys`; needed only when `apiKeys` is set",
                },
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
                "basic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "The key as the password (any user name)",
                },
            },
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
            },
        },
    }
