"""The repository documents itself: no file points outside it, and every link into docs/ resolves.

- No tracked file mentions the old out-of-repository specification (its folder or its file names),
  unless a file of that name exists in the repository.
- Every relative Markdown link in README.md and docs/*.md, and every `docs/<page>.md#<anchor>`
  cited anywhere in the repository, names an existing file and, for a Markdown page, an existing
  heading (GitHub's anchor rules).
"""
from __future__ import annotations

import re
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Spelled in pieces so that this file does not match itself.
OUTSIDE_PATHS = ("../" + "shared", "shared" + "/spec", "shared" + "/reference")
SPEC_NAMES = tuple(name + ".md" for name in ("METHODS", "PAPER", "DESIGN", "STYLE", "gpu-baseline"))

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"""<a\s+(?:name|id)=["']([^"']+)["']""")
MD_LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")
DOCS_CITATION = re.compile(r"(?<![\w./-])(docs/[\w./-]+?\.md)(?:#([\w-]+))?")


@lru_cache(maxsize=1)
def repo_files() -> tuple[str, ...]:
    """Tracked files, plus new files git does not ignore (so the check holds before a commit)."""
    try:
        done = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                              cwd=ROOT, capture_output=True, timeout=30, check=True)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"not a git checkout ({exc})")
    files = sorted({p for p in done.stdout.decode().split("\0") if p and (ROOT / p).is_file()})
    if not files:
        pytest.skip("not a git checkout: git lists no files")
    return tuple(files)


def read_text(relative: str) -> str:
    return (ROOT / relative).read_bytes().decode("utf-8", errors="ignore")


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: link markup reduced to its text, lowercase, every character
    other than a letter, digit, '_', '-' or space dropped, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset[str]:
    """Every anchor a Markdown file defines: its headings (duplicates get -1, -2, … as on GitHub)
    and explicit <a name/id> tags."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if match:
            slug = github_anchor(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(found)


def check_target(source: str, path: Path, anchor: str | None) -> str | None:
    """Why a link from `source` to `path#anchor` is broken, or None."""
    try:
        shown = path.resolve().relative_to(ROOT)
    except ValueError:
        return f"{source}: {path} lies outside the repository"
    if not path.exists():
        return f"{source}: {shown} does not exist"
    if anchor and path.suffix == ".md" and anchor not in anchors(path.resolve()):
        return f"{source}: {shown} has no heading for #{anchor}"
    return None


def test_no_tracked_file_points_outside_the_repository():
    files = repo_files()
    present = {Path(f).name for f in files}
    missing_names = [name for name in SPEC_NAMES if name not in present]
    problems = []
    for relative in files:
        for number, line in enumerate(read_text(relative).splitlines(), start=1):
            hits = [p for p in OUTSIDE_PATHS if p in line] + [n for n in missing_names if n in line]
            if hits:
                problems.append(f"{relative}:{number}: {', '.join(hits)}: {line.strip()[:120]}")
    assert not problems, ("files that cite a specification outside the repository; cite the matching "
                          "docs/ section instead:\n" + "\n".join(problems))


def test_markdown_links_in_readme_and_docs_resolve():
    repo_files()  # the same checkout condition as the other tests
    pages = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    problems = []
    for page in pages:
        if not page.exists():
            continue
        for number, line in prose_lines(page.read_text(encoding="utf-8")):
            for target in MD_LINK.findall(INLINE_CODE.sub("", line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: …
                    continue
                path_part, _, anchor = target.partition("#")
                path = page if not path_part else page.parent / path_part
                problem = check_target(f"{page.relative_to(ROOT)}:{number}", path, anchor or None)
                if problem:
                    problems.append(problem)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_docs_sections_cited_in_the_repository_exist():
    problems = []
    for relative in repo_files():
        for number, line in enumerate(read_text(relative).splitlines(), start=1):
            for page, anchor in DOCS_CITATION.findall(line):
                problem = check_target(f"{relative}:{number}", ROOT / page, anchor or None)
                if problem:
                    problems.append(problem)
    assert not problems, "citations of docs/ sections that do not exist:\n" + "\n".join(problems)


@pytest.mark.parametrize("heading, anchor", [
    ("Which number is reported", "which-number-is-reported"),
    ("OKDPH presets from Tables 6 and 7", "okdph-presets-from-tables-6-and-7"),
    ("Concurrency, divergence and bad input", "concurrency-divergence-and-bad-input"),
    ("`paper` metric: best epoch", "paper-metric-best-epoch"),
    ("A & B", "a--b"),
    ("See [the docs](README.md)", "see-the-docs"),
])
def test_github_anchor_rules(heading, anchor):
    assert github_anchor(heading) == anchor


def test_every_bad_input_case_is_listed_with_its_message():
    """docs/bad-input.md is written by benchmarks/bad_input_table.py from tests/test_bad_input.py's
    cases: a case added without rewriting it is missing there."""
    from test_bad_input import CASES

    rows = {line.split("|")[1].strip() for line in (ROOT / "docs" / "bad-input.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| case ")}
    assert rows == {case[0] for case in CASES}
