"""Text from hosts, made safe to show.

A host's answers (errors, states, log lines, names in its JSON) reach the
operator's terminal. Control characters in them could move the cursor,
recolour or rewrite the screen, or hide what came before (ANSI and OSC
escape sequences), so they are removed before anything is shown; the CLI
also never reads such text as rich markup. Printable Unicode is kept as is.
"""

from __future__ import annotations

import re

# C0 controls and DEL, C1 controls (0x80-0x9f, which some terminals obey as
# escape sequences), and the Unicode line/paragraph separators and bidi
# overrides that can make text display other than it reads.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_BREAKS = re.compile(r"[\t\n\r]+")


def clean_text(text: object, *, one_line: bool = True) -> str:
    """`text` as a string with control characters removed; with `one_line`
    (the default), tabs and line breaks become single spaces."""
    value = str(text)
    if one_line:
        value = _BREAKS.sub(" ", value)
    return _CONTROL.sub("", value)
