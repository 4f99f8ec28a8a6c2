"""HTML pages from ``string.Template``s: every value escaped unless it is already HTML.

Below the demo report and the training report and queue pages, which all fill their templates this way.
"""

from __future__ import annotations

import html
from string import Template


class Html(str):
    """A fragment that is already HTML: ``fill`` inserts it as it is."""


def fill(template: Template, **values) -> Html:
    """``template`` with every value escaped, except ``Html`` fragments; a missing value is an error."""
    return Html(template.substitute({k: v if isinstance(v, Html) else html.escape(str(v))
                                     for k, v in values.items()}))


def lines(fragments) -> Html:
    return Html("\n".join(fragments))
