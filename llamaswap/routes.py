"""The routes llamaswap relays to a model: every llama-server route, at its own path.

This table is the one place that lists them and their methods: ``api.py`` registers
a handler for each entry, ``openapi.py`` describes them, the docs list them.  A
client written for one ``llama-server`` keeps working when llamaswap stands where
the server stood.
"""

from __future__ import annotations

import re
from enum import Enum

import attrs


class Body(Enum):
    """How a route's request body names its model."""

    #: a JSON object (or a multipart form) whose ``model`` picks the model; the
    #: model's filters and ``useModelName`` apply to it
    JSON = "json"
    #: the child's business (a JSON list, an empty body, any bytes): relayed as it
    #: came; ``model`` is read from it only if it is a JSON object
    OPAQUE = "opaque"


@attrs.frozen
class ModelRoute:
    """One path llamaswap relays to the model a request names."""

    path: str  # OpenAPI style: ``/slots/{id_slot}``
    methods: tuple[str, ...]
    summary: str
    tag: str = "llama-server"
    body: Body = Body.JSON
    #: streamed requests for a model that is still loading may get its progress
    loading: bool = False
    #: also served by servers other than llama-server (not in its route list)
    llama_server: bool = True

    @property
    def rule(self) -> str:
        """The path as a werkzeug rule (``/slots/<id_slot>``)."""
        return re.sub(r"\{(\w+)\}", r"<\1>", self.path)

    @property
    def allow(self) -> bytes:
        """The ``Allow`` header value: the methods, and OPTIONS."""
        return ", ".join((*self.methods, "OPTIONS")).encode("ascii")


_OPENAI = "OpenAI-compatible"
_ANTHROPIC = "Anthropic-compatible"
_POST = ("POST",)
_GET = ("GET",)

MODEL_ROUTES: tuple[ModelRoute, ...] = (
    # OpenAI-compatible, with and without /v1 (llama-server serves both)
    ModelRoute("/v1/chat/completions", _POST, "Chat completions", _OPENAI, loading=True),
    ModelRoute("/chat/completions", _POST, "Chat completions", _OPENAI, loading=True),
    ModelRoute("/v1/completions", _POST, "Text completions", _OPENAI),
    ModelRoute("/completions", _POST, "Text completions", _OPENAI),
    ModelRoute("/v1/responses", _POST, "Responses API", _OPENAI),
    ModelRoute("/responses", _POST, "Responses API", _OPENAI),
    ModelRoute("/v1/embeddings", _POST, "Embeddings", _OPENAI),
    ModelRoute("/embeddings", _POST, "Embeddings (llama.cpp's own shape)"),
    ModelRoute("/embedding", _POST, "Embeddings (legacy path)"),
    ModelRoute("/v1/audio/transcriptions", _POST, "Speech to text (multipart form)", _OPENAI),
    ModelRoute("/audio/transcriptions", _POST, "Speech to text (multipart form)", _OPENAI),
    ModelRoute("/v1/chat/completions/input_tokens", _POST, "Count a chat request's prompt tokens"),
    ModelRoute("/chat/completions/input_tokens", _POST, "Count a chat request's prompt tokens"),
    ModelRoute("/v1/responses/input_tokens", _POST, "Count a Responses request's input tokens"),
    ModelRoute("/responses/input_tokens", _POST, "Count a Responses request's input tokens"),
    ModelRoute("/v1/chat/completions/control", _POST, "Control a running generation"),
    # reranking
    ModelRoute("/v1/rerank", _POST, "Reranking"),
    ModelRoute("/v1/reranking", _POST, "Reranking"),
    ModelRoute("/rerank", _POST, "Reranking"),
    ModelRoute("/reranking", _POST, "Reranking"),
    # Anthropic-compatible
    ModelRoute("/v1/messages", _POST, "Messages", _ANTHROPIC),
    ModelRoute("/v1/messages/count_tokens", _POST, "Token counting", _ANTHROPIC),
    # llama.cpp's own
    ModelRoute("/completion", _POST, "Native completion"),
    ModelRoute("/infill", _POST, "Code infill"),
    ModelRoute("/tokenize", _POST, "Text to tokens"),
    ModelRoute("/detokenize", _POST, "Tokens to text"),
    ModelRoute("/apply-template", _POST, "Render a chat as the model's prompt"),
    ModelRoute("/props", ("GET", "POST"), "The server's properties (POST changes them)"),
    ModelRoute("/slots", _GET, "The server's slots"),
    ModelRoute(
        "/slots/{id_slot}",
        _POST,
        "Save, restore or erase a slot (`?action=`)",
        body=Body.OPAQUE,
    ),
    ModelRoute("/lora-adapters", ("GET", "POST"), "List or set LoRA adapters", body=Body.OPAQUE),
    ModelRoute("/tools", ("GET", "POST"), "Server-side tools"),
    ModelRoute("/cors-proxy", ("GET", "POST"), "The web UI's MCP proxy", body=Body.OPAQUE),
    ModelRoute("/v1/stream", ("GET", "DELETE"), "Resume or drop a resumable stream (`?id=`)"),
    ModelRoute("/v1/streams/lookup", _POST, "Find resumable streams"),
    # other servers' media routes
    ModelRoute("/v1/audio/speech", _POST, "Text to speech", _OPENAI, llama_server=False),
    ModelRoute("/v1/images/generations", _POST, "Image generation", _OPENAI, llama_server=False),
    ModelRoute(
        "/v1/images/edits", _POST, "Image edits (multipart form)", _OPENAI, llama_server=False
    ),
)

#: llama-server routes llamaswap answers itself (for the whole set of models)
OWN_ROUTES: dict[str, str] = {
    "/health": "llamaswap is up (`OK`); open without a key",
    "/v1/health": 'llamaswap is up, as llama-server says it (`{"status": "ok"}`); '
    "open without a key",
    "/models": "every configured model",
    "/v1/models": "every configured model",
    "/metrics": "llamaswap's Prometheus metrics (a model's own: `/upstream/<id>/metrics`)",
}
