"""One text field of a multipart/form-data body, found by a bounded scan.

The multipart routes (audio transcriptions, image edits) name their model in a form
field; nothing else in the form is llamaswap's business.  So instead of parsing the
whole form, ``form_field`` walks the parts with ``bytes.find`` (one pass, at C
speed), reads only each part's headers, and gives up past ``MAX_PARTS`` parts or a
part header longer than ``MAX_PART_HEADER`` bytes.  A form bomb of 400,000 tiny
parts therefore costs the reactor a bounded scan, not a parse of every part.
"""

from __future__ import annotations

import re

MAX_PARTS = 1000
MAX_PART_HEADER = 8192

_BOUNDARY = re.compile(rb';\s*boundary\s*=\s*(?:"([^"]{1,70})"|([^;\s"]{1,70}))', re.IGNORECASE)
# name=/filename= parameters of Content-Disposition (quoted or token; RFC 7578)
_PARAM = re.compile(rb';\s*(name|filename)\*?\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))', re.I)


class FormError(ValueError):
    """The body is not a multipart form this scan can read, or breaks a bound."""


def form_field(content_type: bytes, body: bytes, name: bytes) -> bytes | None:
    """The value of the first text field called ``name`` (file parts are skipped),
    or None when the form has no such field."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise FormError("the content type names no boundary")
    delimiter = b"--" + (found.group(1) or found.group(2))
    start = body.find(delimiter)
    if start < 0:
        raise FormError("the body never contains its boundary")
    closing = b"\r\n" + delimiter
    parts = 0
    while True:
        after = start + len(delimiter)
        if body.startswith(b"--", after):
            return None  # the closing delimiter: no such field
        line_end = body.find(b"\r\n", after, after + 256)  # transport padding only
        if line_end < 0:
            raise FormError("a boundary line does not end")
        parts += 1
        if parts > MAX_PARTS:
            raise FormError(f"the form has more than {MAX_PARTS} parts")
        header_end = body.find(b"\r\n\r\n", line_end, line_end + MAX_PART_HEADER + 4)
        if header_end < 0:
            raise FormError(f"a part's headers are missing or longer than {MAX_PART_HEADER} bytes")
        content_start = header_end + 4
        content_end = body.find(closing, content_start)
        if content_end < 0:
            raise FormError("a part is not closed by the boundary")
        if _field_name(body[line_end + 2 : header_end]) == name:
            return body[content_start:content_end]
        start = content_end + 2


def _field_name(headers: bytes) -> bytes | None:
    """The ``name`` of a text part, from its Content-Disposition; None for files."""
    for line in headers.split(b"\r\n"):
        field, _, value = line.partition(b":")
        if field.strip().lower() != b"content-disposition":
            continue
        params = {
            kind.lower(): quoted or token
            for kind, quoted, token in _PARAM.findall(b";" + value.partition(b";")[2])
        }
        if b"filename" in params:
            return None
        raw = params.get(b"name")
        return raw.replace(b'\\"', b'"') if raw is not None else None
    return None
