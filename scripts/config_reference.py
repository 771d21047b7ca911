#!/usr/bin/env python3
"""Write docs/configuration.md, the configuration reference, from the config schema.

Every key comes from ``mosaic_flwr.config.spec()`` (its type, and what its check accepts, found
by asking the check about values out of range), its default and its comment from
``pyproject.toml``'s ``[tool.flwr.app.config]`` tables (the text after ``#`` on the key's line;
a method's table ``[tool.flwr.app.config.dense]`` gives ``dense.<key>``), and the page that
explains it from the settings tables of the docs (``| `key` | ... |`` rows).

    .venv/bin/python scripts/config_reference.py           # write docs/configuration.md
    .venv/bin/python scripts/config_reference.py --check   # exit 1 if it is out of date

``tests/test_documented_commands.py`` fails when the file differs from this script's output.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mosaic_flwr.config import RENAMED, load_defaults, spec  # noqa: E402
from mosaic_flwr.registry import STRATEGIES  # noqa: E402

OUT = ROOT / "docs" / "configuration.md"
COMMAND = ".venv/bin/python scripts/config_reference.py"
TABLE = "tool.flwr.app.config"

# The groups of the top-level keys, in order: (title, keys). A key in no group lands in
# "Other settings", so a new key never breaks the page; place it here.
GROUPS: list[tuple[str, list[str]]] = [
    ("Method, data and evaluation", [
        "strategy", "dataset", "data-dir", "download", "validation-split", "test-subset", "augment"]),
    ("Partition: how the data is split among the clients", [
        "partition", "alpha", "min-partition-size", "partition-cap", "shards-per-client"]),
    ("Models and model heterogeneity", ["model", "client-models", "client-capacities", "submodel"]),
    ("Rounds and local training", [
        "num-server-rounds", "fraction-train", "min-train-clients", "local-steps", "local-epochs",
        "batch-size", "lr", "momentum", "weight-decay", "lr-schedule", "proximal-mu", "init-from"]),
    ("Run, output and hardware", [
        "seed", "output-dir", "run-name", "device", "eval-batch-size", "client-threads",
        "server-threads", "checkpoint", "resume"]),
    ("Reliability: waits, faults, robust aggregation", [
        "round-timeout", "connect-timeout", "straggler-quorum", "straggler-factor", "straggler-floor",
        "reply-max-mb", "min-replies", "round-retries", "aggregation", "trim-fraction",
        "max-client-share", "count-clip"]),
    ("The distillation schedule (every distilling method)", ["warmup-rounds", "finetune-lr"]),
    ("Privacy of Mosaic's uploads", ["privacy-audit", "count-floor"]),
]

OLD_TITLE = "Old names (deprecated)"

# The namespaces' titles (else a method's title, else its name).
NAMESPACE_TITLES = {"kd": "The distillation core", "dp": "Differential privacy of Mosaic's uploads", "mosaic": "Mosaic"}


@dataclass
class Entry:
    key: str
    raw_default: str
    comment: str = ""


@dataclass
class Source:
    """What pyproject.toml says: every key's default text and comment, in file order, the
    comment blocks standing before a key or table, and the comments on table headers."""

    entries: dict[str, Entry] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)        # key or "[table]" -> comment block before it
    tables: dict[str, str] = field(default_factory=dict)       # method -> comment on its header


def split_comment(line: str) -> tuple[str, str]:
    """``'key = "a # b"  # says x'`` -> ``('key = "a # b"', 'says x')``: the first ``#``
    outside a TOML string."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == "\\" and quote == '"':
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def read_pyproject(path: Path = ROOT / "pyproject.toml") -> Source:
    src, prefix, inside, pending = Source(), None, False, []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            body, comment = split_comment(line)
            name = body.strip("[] ")
            inside = name == TABLE or name.startswith(TABLE + ".")
            if inside:
                prefix = name[len(TABLE) + 1:] if name != TABLE else ""
                if prefix:
                    src.tables[prefix] = comment
                    if pending:
                        src.notes[f"[{prefix}]"] = " ".join(pending)
            pending = []
            continue
        if not inside:
            continue
        if not line:
            pending = []
        elif line.startswith("#"):
            pending.append(line.lstrip("#").strip())
        else:
            body, comment = split_comment(line)
            key, _, value = body.partition("=")
            key = (f"{prefix}." if prefix else "") + key.strip()
            src.entries[key] = Entry(key, value.strip(), comment)
            if pending:
                src.notes[key] = " ".join(pending)
            pending = []
    return src


# ----------------------------------------------------------------------------- what a check accepts
def _clean(message: str) -> str:
    message = re.sub(r", got [^ ()]+", "", message)
    return message.replace("must be ", "", 1) if message.startswith("must be ") else message


def accepted(key: str, typ: type, check) -> str:
    """What the key's check accepts, in words, from the check's own messages."""
    if typ is bool:
        return "`true` or `false`"
    if check is None:
        return "any"
    if typ is str:
        message = check("\x00")
        if not message:
            return "any"
        found = re.search(r"allowed: (\[.*\])", message)
        if found:
            values = ", ".join(f"`{v}`" for v in ast.literal_eval(found.group(1)))
            if message.startswith("unknown value"):
                return f"one of {values}"
            return f"comma-separated, each one of {values}"
        return _clean(message.replace("expected ", "", 1))
    low, high = (-10**12, 10**12) if typ is int else (-1e300, 1e300)
    for probe in (low, high):
        message = check(probe)
        if message:
            return _clean(message)
    return "any number" if typ is float else "any integer"


# ----------------------------------------------------------------------------- where a key is explained
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(text: str) -> list[tuple[int, str]]:
    """(line index, anchor) of every heading of a markdown text, outside fenced code, with
    GitHub's ``-1``, ``-2`` suffixes for repeated headings."""
    out, seen, fenced = [], {}, False
    for i, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            base = slug(line.lstrip("#"))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.append((i, base if n == 0 else f"{base}-{n}"))
    return out


def explained_in() -> dict[str, str]:
    """key -> a markdown link to the first settings table (docs pages, then the README) whose
    row names the key in its first cell."""
    pages = sorted(p for p in (ROOT / "docs").glob("*.md") if p != OUT) + [ROOT / "README.md"]
    where: dict[str, str] = {}
    for page in pages:
        text = page.read_text()
        anchors = dict(headings(text))
        anchor, name = "", "README" if page.name == "README.md" else page.stem.replace("-", " ").capitalize()
        target = f"../{page.name}" if page.name == "README.md" else page.name
        for i, line in enumerate(text.splitlines()):
            anchor = anchors.get(i, anchor)
            if line.startswith("| `"):
                for key in re.findall(r"`([a-z0-9.-]+)`", line.split("|")[1]):
                    where.setdefault(key, f"[{name}]({target}#{anchor})" if anchor else f"[{name}]({target})")
    return where


# ----------------------------------------------------------------------------- the page
def cell(text: str) -> str:
    """Text for a table cell: ``|`` escaped, and ``<word`` kept from reading as an HTML tag."""
    return re.sub(r"<(?=[A-Za-z/])", "&lt;", text.replace("|", "\\|"))


def render() -> str:
    keys, defaults, src = spec(), load_defaults(), read_pyproject()
    missing = sorted(set(keys) - set(src.entries))
    if missing:
        raise SystemExit(f"config_reference: no default in pyproject.toml for {missing}")
    old = {k for k in src.entries if k in RENAMED}  # placeholders of the old names: their own table
    unknown = sorted(set(src.entries) - set(keys) - old)
    if unknown:
        raise SystemExit(f"config_reference: pyproject.toml keys the schema does not know: {unknown}")
    assert set(defaults) == set(src.entries), "load_defaults and the pyproject parser disagree"
    where = explained_in()

    grouped: list[tuple[str, str, list[str]]] = []
    placed: set[str] = set()
    for title, group in GROUPS:
        members = [k for k in group if k in keys]
        placed.update(members)
        if members:
            grouped.append((title, "", members))
    other = [k for k in keys if "." not in k and k not in placed]
    if other:
        grouped.append(("Other settings", "", other))
    methods = list(dict.fromkeys(k.split(".", 1)[0] for k in src.entries if "." in k))  # (and kd, dp)
    methods += [m for m in dict.fromkeys(k.split(".", 1)[0] for k in keys if "." in k) if m not in methods]
    for method in methods:
        members = [k for k in src.entries if k.startswith(method + ".")]
        members += [k for k in keys if k.startswith(method + ".") and k not in members]
        name = NAMESPACE_TITLES.get(method) or (STRATEGIES[method].title or method if method in STRATEGIES else method)
        title = f"{name} (`{method}.*`)"
        grouped.append((title, src.tables.get(method, ""), members))

    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{COMMAND}` from mosaic_flwr.config.spec() and pyproject.toml; do not edit. -->",
        "",
        "Every run-config key: its type, its default (`pyproject.toml`, `[tool.flwr.app.config]`;",
        "a method's own keys in `[tool.flwr.app.config.<method>]`, set as `<method>.<key>`), what its",
        "check accepts, the comment beside it in `pyproject.toml`, and the page that explains it.",
        "Override any of them with `--run-config \"key=value ...\"` or a file in `conf/`",
        "([Running](running.md#settings---run-config-and-the-files-in-conf)). A value outside what is",
        "accepted stops the run before any training, with one line naming the key.",
        "",
    ]
    for title, intro, _ in grouped:
        lines.append(f"- [{title}](#{slug(title)})")
    lines.append(f"- [{OLD_TITLE}](#{slug(OLD_TITLE)})")
    lines.append("")
    method_intro_done = False
    for title, intro, members in grouped:
        if "." in members[0] and not method_intro_done:
            method_intro_done = True
            first_table = f"[{members[0].split('.', 1)[0]}]"
            if first_table in src.notes:
                lines += [f"*{cell(src.notes[first_table])}*", ""]
        lines += [f"## {title}", ""]
        if intro:
            lines += [cell(intro[0].upper() + intro[1:]) + ".", ""]
        note = src.notes.get(members[0])
        if note:
            lines += [f"*{cell(note)}*", ""]
        lines += ["| key | type | default | accepted | comment in `pyproject.toml` | explained in |",
                  "|---|---|---|---|---|---|"]
        for key in members:
            typ, check = keys[key]
            entry = src.entries[key]
            lines.append(f"| `{key}` | {typ.__name__} | `{cell(entry.raw_default)}` | {cell(accepted(key, typ, check))} | "
                         f"{cell(entry.comment)} | {where.get(key, '')} |")
        lines.append("")
    lines += [f"## {OLD_TITLE}", "",
              "The names these keys had before they were namespaced by their owner (CHANGELOG.md, 2026-12-07). "
              "Each still works for one release: it is read as its new name, with one warning line "
              "(`kd-steps is deprecated: use kd.steps (the old name stops working in the next release)`); "
              "`pyproject.toml` declares it as `\"\"` (not given) so that Flower accepts it. Given beside its new "
              "name with a different value, it stops the run. `preset` is gone: pass `--run-config conf/NAME.toml`.",
              "", "| old name | new name |", "|---|---|"]
    lines += [f"| `{old}` | `{new}` |" for old, new in RENAMED.items()]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
