"""Moderation rules beside the sentiment label: keywords and regular expressions, each with a severity and an
optional category, read from a small text file; the rules a text matches; and the triage order they give.

    python -m allinone_gguf classify messages.txt -o triage.csv --rules docs/rules.example.txt --sort priority
    python app.py --rules docs/rules.example.txt      # /v1/classify items carry their matches; "order": "triage"

A rules file holds one rule per line, its fields separated by blanks (spaces, tabs, the full-width space):

    SEVERITY  KIND  PATTERN  [CATEGORY]  [# comment]

SEVERITY is one of SEVERITIES (low < medium < high < critical). KIND `keyword`: literal words separated by `|`,
found anywhere in the text, ignoring case; a word that begins or ends with an ASCII letter or digit must not
touch another one there (`kill` misses "skill", `退款` is found inside "申请退款"). KIND `regex`: a Python regular
expression, searched ignoring case; one that matches the empty text is refused (it would match every text).
A PATTERN with blanks goes in double quotes ("kill myself"); a quoted field ends at the first `"` followed by a
blank or the line's end. CATEGORY is one word, the rule's name in the output (the pattern stands in without
one). A line whose first field starts with `#` is a comment, so is anything from a `#` field after the
PATTERN; blank lines are skipped; a UTF-8 BOM and CRLF line ends are fine. Rules add to the label, never change
it. Every mistake is one RulesError naming the file and the line.

    >>> rules = parse_rules('''# severity  kind     pattern          category
    ... high        regex    自杀|不想活(了)?   self-harm
    ... medium      keyword  refund|退款        billing     # money back
    ... ''')
    >>> [(m.name, m.severity, m.text) for m in rules.match("I want a REFUND, 不想活了")]
    [('self-harm', 'high', '不想活了'), ('billing', 'medium', 'REFUND')]
    >>> row_columns(rules.match("申请退款"))
    {'severity': 'medium', 'rules': 'billing'}
"""
from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

SEVERITIES = ("low", "medium", "high", "critical")   # ascending: the triage order puts the last first
KINDS = ("keyword", "regex")
RULE_COLUMNS = ("severity", "rules")                  # appended to every output row when rules are given
MATCH_CHARS = 80                                      # longest matched text an API item shows

_LINE_END = re.compile(r"\r\n|\r|\n")                 # the line ends Python's text mode knows
_BLANKS = re.compile(r"\s*")
_FIELD = re.compile(r'"(.*?)"(?=\s|$)|("\S*)|(\S+)')  # quoted | a quote never closed | bare
_ASCII_WORD = re.compile(r"[A-Za-z0-9]")
_SHAPE = "SEVERITY KIND PATTERN [CATEGORY]"


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file and, for a bad rule, its line."""


@dataclass(frozen=True)
class Rule:
    line: int                 # 1-based line of the rules file
    severity: str             # one of SEVERITIES
    kind: str                 # one of KINDS
    pattern: str              # as written in the file
    category: str | None
    regex: re.Pattern         # what is searched: a keyword's words become escaped alternatives

    @property
    def name(self) -> str:
        return self.category or self.pattern


@dataclass(frozen=True)
class Match:
    rule: Rule
    text: str                 # the span of the input the rule found

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def severity(self) -> str:
        return self.rule.severity


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    source: str = "<rules>"   # the file, for messages
    sha256: str = ""          # of the file's bytes: a resumed run checks it used the same rules

    def match(self, text: str) -> list[Match]:
        """The rules `text` matches, most severe first (file order among equals), one Match each."""
        found = [Match(r, m.group()) for r in self.rules if (m := r.regex.search(text))]
        return sorted(found, key=lambda m: -severity_rank(m.severity))

    def __len__(self) -> int:
        return len(self.rules)


def severity_rank(severity: str | None) -> int:
    """0 for no severity (no rule matched), then 1 (low) to 4 (critical)."""
    return SEVERITIES.index(severity) + 1 if severity in SEVERITIES else 0


def highest(matches: list[Match]) -> str | None:
    return max((m.severity for m in matches), key=severity_rank, default=None)


def triage_key(severity: str | None, p_negative: float | None) -> tuple[bool, int, float]:
    """Sort key of the triage order: the most severe rule first, then P(negative) descending; a row without a
    label (p_negative None: an error) last. Without rules every severity is None: P(negative) alone."""
    return (p_negative is None, -severity_rank(severity), -(p_negative or 0.0))


def row_columns(matches: list[Match]) -> dict:
    """The RULE_COLUMNS of one output row: the highest severity and the matched rules' names, `; `-separated."""
    names = list(dict.fromkeys(m.name for m in matches))
    return {"severity": highest(matches), "rules": "; ".join(names) if names else None}


def match_json(m: Match) -> dict:
    """One match as an API item shows it."""
    return {"name": m.name, "category": m.rule.category, "severity": m.severity, "kind": m.rule.kind,
            "line": m.rule.line, "match": m.text[:MATCH_CHARS]}


def _fields(line: str) -> list[str]:
    """The fields of one line, up to a comment: `#` opening the first field, or a field after the PATTERN."""
    fields, pos = [], 0
    while True:
        pos = _BLANKS.match(line, pos).end()
        if pos == len(line) or (line[pos] == "#" and len(fields) not in (1, 2)):
            return fields
        m = _FIELD.match(line, pos)
        if m.group(2) is not None:
            raise ValueError(f"the quote at {m.group(2)[:20]!r} is never closed (a closing \" is followed by a "
                             "blank or the end of the line)")
        fields.append(m.group(1) if m.group(1) is not None else m.group(3))
        pos = m.end()


def _keyword_regex(pattern: str) -> re.Pattern:
    words = pattern.split("|")
    if any(not w.strip() for w in words):
        raise ValueError(f"keyword {pattern!r} has an empty word between its |")
    parts = [("(?<![A-Za-z0-9])" if _ASCII_WORD.fullmatch(w[0]) else "") + re.escape(w)
             + ("(?![A-Za-z0-9])" if _ASCII_WORD.fullmatch(w[-1]) else "") for w in words]
    return re.compile("|".join(parts), re.IGNORECASE)


def _regex(pattern: str) -> re.Pattern:
    try:
        with warnings.catch_warnings():      # e.g. "possible nested set": a valid pattern is not refused for it
            warnings.simplefilter("ignore")
            rx = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
    except (OverflowError, RecursionError) as exc:
        raise ValueError(f"bad regular expression {pattern!r}: too large ({exc})") from None
    if rx.search("") is not None:
        raise ValueError(f"regular expression {pattern!r} matches the empty text, so it would match every text")
    return rx


def parse_rule(line: str, number: int) -> Rule | None:
    """The rule on one line (None for a blank or comment line); ValueError saying what is wrong."""
    fields = _fields(line)
    if not fields:
        return None
    if len(fields) < 3:
        raise ValueError(f"expected {_SHAPE}, found {len(fields)} field{'s' * (len(fields) > 1)}")
    if len(fields) > 4:
        raise ValueError(f"expected {_SHAPE}, found {len(fields)} fields: quote a pattern with blanks "
                         "(\"kill myself\"), start a comment with #")
    severity, kind, pattern = fields[0].lower(), fields[1].lower(), fields[2]
    if severity not in SEVERITIES:
        raise ValueError(f"unknown severity {fields[0]!r} (one of {', '.join(SEVERITIES)})")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {fields[1]!r} (one of {', '.join(KINDS)})")
    if not pattern:
        raise ValueError("empty pattern")
    regex = _keyword_regex(pattern) if kind == "keyword" else _regex(pattern)
    return Rule(number, severity, kind, pattern, fields[3] if len(fields) > 3 else None, regex)


def parse_rules(text: str, source: str = "<rules>", sha256: str = "") -> RuleSet:
    """Every rule of a rules file's text; RulesError("SOURCE, line N: why") at the first bad line."""
    rules = []
    for number, line in enumerate(_LINE_END.split(text.removeprefix("\ufeff")), 1):
        try:
            rule = parse_rule(line, number)
        except ValueError as exc:
            raise RulesError(f"{source}, line {number}: {exc}") from None
        if rule is not None:
            rules.append(rule)
    return RuleSet(tuple(rules), source, sha256)


def load_rules(path: str | Path) -> RuleSet:
    """The rules of a UTF-8 file (a BOM is fine); RulesError for a file that cannot be read, is not UTF-8, has a
    bad line, or holds no rule at all."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RulesError(f"{path}: cannot read the rules file ({exc.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise RulesError(f"{path}, line {line}: not UTF-8 (byte {data[exc.start]:#04x})") from None
    rules = parse_rules(text, str(path), hashlib.sha256(data).hexdigest())
    if not rules:
        raise RulesError(f"{path}: no rules in the file (every line is blank or a comment)")
    return rules
