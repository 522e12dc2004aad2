"""Twisted's HTTP client (``twisted.web.client``), imported when first used.

An idle llamaswap sends no request: its children and peers are reached once a
request names a model, and most of those go through the lean client
(:mod:`llamaswap.childhttp`), which only needs the standard client's exception
types and URI parser.  Importing it at startup would cost ~0.35 MiB of an idle
daemon's memory.  Modules write ``webclient.ResponseDone``; the first such use
imports Twisted's module, and the name is then a plain attribute of this one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from twisted.web.client import (
        URI,
        Agent,
        BrowserLikePolicyForHTTPS,
        HTTPConnectionPool,
        RequestGenerationFailed,
        ResponseDone,
        ResponseFailed,
        ResponseNeverReceived,
        readBody,
    )

#: what llamaswap uses of Twisted's client
__all__ = [
    "URI",
    "Agent",
    "BrowserLikePolicyForHTTPS",
    "HTTPConnectionPool",
    "RequestGenerationFailed",
    "ResponseDone",
    "ResponseFailed",
    "ResponseNeverReceived",
    "readBody",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from twisted.web import client

    value = getattr(client, name)
    globals()[name] = value  # looked up directly from now on
    return value
