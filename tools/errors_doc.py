"""Render the error catalog as Markdown: ``python -m tools.errors_doc > docs/errors.md``.

A test keeps docs/errors.md equal to this output, so the documentation cannot drift from the
catalog clients actually receive.
"""

from __future__ import annotations

from apirouter.errors import CATALOG, CATEGORY_RANGES


def render() -> str:
    lines = [
        "# Error catalog",
        "",
        "Generated from `apirouter/errors.py` by `python -m tools.errors_doc`; do not edit.",
        "",
        "Native endpoints answer errors as",
        "`{\"error\": {code, error_code, category, message, retriable, details?, field?},",
        "\"meta\": {timestamp, request_id, documentation_url}}`; OpenAI-compatible endpoints",
        "use OpenAI's shape `{\"error\": {message, type, param, code}}` with `code` the",
        "lower-cased `error_code`, so the official SDKs raise the exception class of the status.",
        "",
        "| range | category |",
        "|---|---|",
    ]
    lines += [f"| {r.start}-{r.stop - 1} | {c.value} |" for c, r in CATEGORY_RANGES.items()]
    lines += ["", "| number | error_code | HTTP | category | retriable | meaning |",
              "|---|---|---|---|---|---|"]
    for spec in sorted(CATALOG.values(), key=lambda s: s.number):
        lines.append(f"| <a id=\"{spec.number}\"></a>{spec.number} | `{spec.name}` | "
                     f"{spec.status} | {spec.category.value} | "
                     f"{'yes' if spec.retriable else 'no'} | {spec.default_message} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
