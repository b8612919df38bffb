"""What a bearer token may hold: the rule the manifest's ui_token and the CLI's --token share.

It travels in an HTTP `Authorization` header, where only ASCII arrives as it was meant (a
browser and Python's http.client send other characters as Latin-1, or not at all, while curl
sends UTF-8), and the server strips the spaces around it. Kept free of pydantic, so the CLI can
check a token without loading the manifest's models. The dashboard's app.js applies it too.
"""

from __future__ import annotations

import re

TOKEN_RULE = (
    "expected printable ASCII only (the characters ! to ~: no spaces, control or non-ASCII characters), "
    "as a token travels in an HTTP Authorization header"
)

_PRINTABLE_ASCII = re.compile(r"[!-~]+")


def token_problem(token: str) -> str | None:
    """Why `token` cannot be sent as `Authorization: Bearer <token>`, or None if it can.

    Says what kind of character is at fault, never which: the token is a secret.
    """
    if _PRINTABLE_ASCII.fullmatch(token):
        return None
    if not token.strip():
        found = "is empty" if not token else "holds only whitespace"
    elif token[0].isspace():
        found = "begins with whitespace"
    elif token[-1].isspace():
        found = "ends with whitespace"
    else:
        wrong = next(char for char in token if not "!" <= char <= "~")
        if wrong == " ":
            found = "holds a space"
        elif wrong.isascii():
            found = "holds a control character"  # (a tab and a line end among them)
        else:
            found = "holds a non-ASCII character"
    return f"{TOKEN_RULE}; this one {found}"
