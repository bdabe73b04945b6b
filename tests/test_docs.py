"""The documentation's claims are checked: README.md, docs/ and BENCHMARKS.md name files that exist, the
``safefreeze`` commands they show parse, and the README's results table holds the numbers of the files it cites.

- Paths: every repository path written in the text (``src/...``, ``tests/...``, ``bench/...``, ``examples/...``,
  ``docs/...``, ``safefreeze/...`` as short for ``src/safefreeze/...``) exists; ``*`` and ``{a,b}`` are expanded.
  A path exists when a clean clone holds it (git's tracked and not-ignored files, so that a file present only here
  fails here as it fails in CI). Paths under ``bench/results/`` are what a bench command writes (git-ignored, never
  committed) and are not looked up; neither are placeholders (``<task>``, ``NAME``, ``...``).
- Commands: every ``safefreeze SUBCOMMAND ...`` line of a code block in README.md and docs/ (also after
  ``torchrun ... -m safefreeze.cli``) and every inline ``safefreeze ...`` command is accepted by the parser
  ``safefreeze.cli.build_parser`` builds: the subcommand exists and takes the flags given. Nothing is run.
- Results: the README's ``## Results`` table. Each row names its committed CSV file (a cell holding
  ``bench/...csv``) and the CSV row it is read from (the ``name`` column, in backticks in the row); every other
  number in the row must be a value of that CSV row, as written or as a percentage, at the README's precision.
- Tables that must be complete: the config-file table in docs/cli.md lists every section and option ``--config``
  accepts; docs/report.md names every key run_report.py writes and every step-record field.
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import glob
import io
import itertools
import re
import shlex
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import fields
from pathlib import Path

import pytest

from safefreeze.cli import OPTION_GROUPS, build_parser
from safefreeze.training.configfile import RUN_FLAGS
from safefreeze.training.records import StepRecord

ROOT = Path(__file__).parents[1]
DOCS = sorted((ROOT / "docs").rglob("*.md"))
USER_DOCS = [ROOT / "README.md", *DOCS]  # commands and results are checked here
ALL_DOCS = [*USER_DOCS, ROOT / "BENCHMARKS.md", ROOT / "CHANGELOG.md"]  # paths are checked everywhere

# A repository path: one of the top folders, then path characters; it ends on a letter, digit, '*' or '}'.
PATH = re.compile(r"(?<![\w./~-])((?:src|tests|bench|examples|docs|safefreeze)/[\w./*{},+=@-]*[\w*}])")
NOT_LOOKED_UP = ("bench/results",)  # written by the commands shown, git-ignored
PLACEHOLDER = re.compile(r"<|\.\.\.|\b[A-Z]{3,}\b")  # <task>, ..., NAME / DIR / FILE
TEMPLATE_TAIL = re.compile(r"[\w./*{},+=@-]*<")  # the path goes on into a <placeholder>: a pattern, not a path


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _expand_braces(text: str) -> list[str]:
    """``a.{json,csv}`` -> ``a.json``, ``a.csv`` (one level, as the docs use it)."""
    parts = re.split(r"\{([^{}]*)\}", text)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def mentioned_paths(text: str) -> set[str]:
    paths = set()
    for match in PATH.finditer(text):
        path = match.group(1).rstrip(".")
        if path.startswith("safefreeze/"):
            if "." not in path.rsplit("/", 1)[-1] and "/" not in path[len("safefreeze/") :]:
                continue  # 'safefreeze/x' as prose, e.g. a module path without extension at top level
            path = "src/" + path
        templated = PLACEHOLDER.search(path) or TEMPLATE_TAIL.match(text, match.end())  # frontier-<tag>.png
        if path in NOT_LOOKED_UP or path.startswith(tuple(p + "/" for p in NOT_LOOKED_UP)) or templated:
            continue
        paths.add(path)
    return paths


@functools.cache
def _clone_files() -> tuple[str, ...] | None:
    """The files a clean clone of this checkout holds (tracked, or new and not ignored); None outside git."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    )
    return tuple(listed.stdout.splitlines()) if listed.returncode == 0 else None


def _exists(path: str) -> bool:
    files = _clone_files()
    if files is None:
        return all(glob.glob(str(ROOT / variant)) for variant in _expand_braces(path))
    return all(
        any(fnmatch.fnmatchcase(f, variant) or fnmatch.fnmatchcase(f, variant + "/*") for f in files)
        for variant in _expand_braces(path)
    )


@pytest.mark.parametrize("doc", ALL_DOCS, ids=_rel)
def test_every_path_mentioned_exists(doc):
    missing = sorted(p for p in mentioned_paths(doc.read_text(encoding="utf-8")) if not _exists(p))
    assert not missing, f"{_rel(doc)} names paths that do not exist: {missing}"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[\w-]*\n(.*?)^```", text, flags=re.S | re.M)


COMMAND = re.compile(
    r"(?:^|\s)(?:\S*/)?safefreeze(?:\.cli)?\s+((?:train|compare|bench|plot|landscape|export-model|\w[\w-]*)\b.*)"
)


def shown_commands(text: str) -> list[str]:
    """``safefreeze ...`` command lines of the code blocks (whole commands: they must parse)."""
    commands = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(("#", "from ", "import ", ">>>")) or "(" in line:
                continue  # Python, not a shell line
            match = COMMAND.search(line)
            if match:
                commands.append(match.group(1))
    return commands


def inline_commands(text: str) -> list[str]:
    """Inline ``safefreeze ...`` code spans of the prose (often a subcommand and a flag or two, no arguments)."""
    without_blocks = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = [" ".join(s.split()) for s in re.findall(r"`safefreeze ([^`]+)`", without_blocks)]
    return [s for s in spans if " | " not in s and not re.match(r"[A-Z]+\b", s)]  # alternatives, SUBCOMMAND


def flag_error(command: str) -> str | None:
    """For a partial command: is the subcommand one of the CLI's, and every ``--flag`` one of its options?"""
    argv = shlex.split(command)
    commands = build_parser()._subparsers._group_actions[0].choices
    if argv[0] not in commands:
        return f"no subcommand {argv[0]!r}"
    known = commands[argv[0]]._option_string_actions
    unknown = [a for a in argv[1:] if a.startswith("--") and a.split("=")[0] not in known]
    return f"{argv[0]} has no {unknown}" if unknown else None


def parse_error(command: str) -> str | None:
    """What the CLI's parser says of ``safefreeze COMMAND`` (None when it accepts it)."""
    argv = shlex.split(command)
    if "--help" in argv or "-h" in argv:
        argv = [a for a in argv if a not in ("--help", "-h")]
        argv = argv[:1] if argv and argv[0] != "--config" else argv
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as stop:
        return err.getvalue().strip() or f"exit {stop.code}"
    return None


@pytest.mark.parametrize("doc", USER_DOCS, ids=_rel)
def test_every_command_shown_parses(doc):
    text = doc.read_text(encoding="utf-8")
    failures = [f"safefreeze {c}: {e}" for c in shown_commands(text) if (e := parse_error(c))]
    failures += [f"`safefreeze {c}`: {e}" for c in inline_commands(text) if (e := flag_error(c))]
    assert not failures, f"{_rel(doc)}: commands the CLI does not accept:\n" + "\n".join(failures)


def test_the_docs_show_commands():
    """The command check reads what it should: the README and the CLI page show commands of every kind."""
    shown = {c.split()[0] for doc in USER_DOCS for c in shown_commands(doc.read_text(encoding="utf-8"))}
    assert {"train", "compare", "bench", "plot", "landscape", "export-model"} <= shown


NUMBER = re.compile(r"[-−±+]?\d+(?:\.\d+)?")


def _value(text: str) -> float:
    return float(text.replace("−", "-").replace("±", "").replace("+", ""))


def _found(number: str, values: list[float]) -> bool:
    """``number`` as written is one of ``values`` (or of them as percentages) at its own precision."""
    decimals = len(number.split(".")[1]) if "." in number else 0
    target = _value(number)
    return any(abs(round(v * scale, decimals) - target) < 1e-9 for v in values for scale in (1, 100))


def results_rows(readme: str) -> list[list[str]]:
    section = readme.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]  # after header, rule


def check_results_row(cells: list[str]) -> list[str]:
    """What in one results row is not in the CSV row it cites (empty: every number is)."""
    sources = [c.strip("`") for c in cells if re.fullmatch(r"`?bench/\S+\.csv`?", c)]
    if len(sources) != 1:
        return [f"cites {len(sources)} CSV files, not one"]
    names = [n for c in cells for n in re.findall(r"`([^`]+)`", c) if not n.endswith(".csv")]
    with open(ROOT / sources[0], newline="") as file:
        rows = {row["name"]: row for row in csv.DictReader(file)}
    named = [n for n in names if n in rows]
    if len(named) != 1:
        return [f"names {named or 'no'} row of {sources[0]} (its names: {sorted(rows)})"]
    values = []
    for value in rows[named[0]].values():
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            pass
    problems = []
    for cell in cells:
        if cell.strip("`") == sources[0]:
            continue
        text = re.sub(r"`[^`]*`", "", cell)  # the row's name (k3@t0) is a name, not a claim
        problems += [f"{n} ({sources[0]}, row {named[0]!r})" for n in NUMBER.findall(text) if not _found(n, values)]
    return problems


def test_readme_results_are_in_the_files_they_cite():
    rows = results_rows((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(rows) >= 4, "the README's ## Results table has no rows"
    problems = {row[0] + " " + row[1]: p for row in rows if (p := check_results_row(row))}
    assert not problems, f"README ## Results: numbers not in the cited files: {problems}"


def test_config_file_table_lists_every_section_and_option():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    table = {}
    for line in text.splitlines():
        match = re.match(r"\|\s*`\[(\w+)\]`\s*\|(.*)\|\s*$", line)
        if match:
            table[match.group(1)] = set(re.findall(r"`(\w+)`", match.group(2)))
    sections = {section: {f.name for f in fields(group)} for section, group in OPTION_GROUPS.items()}
    for name, section in RUN_FLAGS.items():
        sections.setdefault(section, set()).add(name)
    assert set(table) == set(sections), f"docs/cli.md's config-file table: sections {sorted(table)}"
    for section, names in sections.items():
        if section == "safe":
            continue  # SafeConfig's fields are listed on the method page
        assert names <= table[section], f"[{section}] lacks {sorted(names - table[section])} in docs/cli.md"


def report_keys() -> set[str]:
    """The keys run_report.py writes (quoted names followed by ':') and every StepRecord field."""
    source = (ROOT / "src" / "safefreeze" / "training" / "run_report.py").read_text(encoding="utf-8")
    return set(re.findall(r'"(\w+)":', source)) | {f.name for f in fields(StepRecord)}


def test_report_schema_names_every_field():
    documented = set(re.findall(r"`(\w+)`", (ROOT / "docs" / "report.md").read_text(encoding="utf-8")))
    missing = sorted(report_keys() - documented)
    assert not missing, f"docs/report.md does not describe the report.json fields {missing}"


# The checks themselves: each must catch what it is for.


def test_the_checks_catch_a_bad_path_flag_and_number():
    assert mentioned_paths("see `src/safefreeze/nowhere.py` and tests/core/test_cka.py") == {
        "src/safefreeze/nowhere.py",
        "tests/core/test_cka.py",
    }
    assert not _exists("src/safefreeze/nowhere.py") and _exists("bench/frontier/minilm-{trec,movies}-n300-b16.csv")
    assert _exists("src/safefreeze/core") and _exists("bench/figures/frontier-*.png")
    assert mentioned_paths("`safefreeze/merge.py`") == {"src/safefreeze/merge.py"}  # a path that moved
    assert shown_commands("```bash\nsafefreeze train --no-such-flag 1   # comment\n```\n") == ["train --no-such-flag 1"]
    assert "unrecognized arguments" in parse_error("train --no-such-flag 1")
    assert "invalid choice" in parse_error("trian --tau 0.1")
    assert inline_commands("run `safefreeze train --taus 1` or `safefreeze SUBCOMMAND --help`") == ["train --taus 1"]
    assert "no ['--taus']" in flag_error("train --taus 1") and flag_error("plot") is None
    assert parse_error("train --tau 0.1 --help") is None
    assert mentioned_paths("runs write to `bench/results/` and bench/results/frontier/x.json") == set()
    assert mentioned_paths("figures `bench/figures/frontier-<tag>.png`") == set()  # a pattern, not a path
    assert not _exists("bench/results")  # git-ignored: a clean clone does not have it, even where this one does
    row = ["TREC", "SAFE (`safe (paper)`)", "84.75", "−2.92", "0.738", "`bench/frontier/minilm-trec-n300-b16-mean.csv`"]
    assert check_results_row(row) == []
    assert check_results_row([*row[:3], "−3.05", *row[4:]])  # a number not in the file
    assert check_results_row([row[0], "SAFE (`k9@t0`)", *row[2:]])  # a row the file does not have
