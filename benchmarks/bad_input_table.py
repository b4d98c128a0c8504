"""Write docs/bad-input.md: every bad input that tests/test_bad_input.py checks, with the one line it
gets, as a newcomer sees it (not part of the test suite; tests/test_docs.py checks that every case
has its row).

    python benchmarks/bad_input_table.py
"""
from __future__ import annotations

import os
import shlex
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's code and cases, whatever pip installed
import test_bad_input  # noqa: E402  (the cases live with their test)

from okdph.cli import main  # noqa: E402

OUT = ROOT / "docs" / "bad-input.md"


def one_case(args, env: dict) -> tuple[str, str, int]:
    """The command line and the stderr of one case, run as the test runs it: in a fresh folder, no GPU."""
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(torch.cuda, "is_available", lambda: False), \
            mock.patch.dict(os.environ, {k: v.format(tmp=tmp) for k, v in env.items()}):
        here = os.getcwd()
        os.chdir(tmp)
        try:
            args = args(Path(tmp)) if callable(args) else args
            result = CliRunner().invoke(main, args)
        finally:
            os.chdir(here)
        command = shlex.join(["okdph-bench", *args]).replace(tmp, "$TMP")
        return command, result.stderr.strip().replace(tmp, "$TMP"), result.exit_code


def main_() -> None:
    rows = []
    for case, args, _message, *env in test_bad_input.CASES:
        command, line, code = one_case(args, env[0] if env else {})
        cell = line.replace("|", "\\|")
        rows.append(f"| {case} | `{command}` | {code} | `{cell}` |")
    OUT.write_text(
        "# Bad input, and what it gets\n\n"
        "Every case [`tests/test_bad_input.py`](../tests/test_bad_input.py) checks: one line on stderr, exit 2,\n"
        "no traceback, nothing on disk changed or created. Written by `python benchmarks/bad_input_table.py`\n"
        "(each case run in a fresh temporary folder, `$TMP`, with no GPU). Damaged records, checkpoints and\n"
        "datasets, signals during set-up, a full disk and a run that cannot fit in memory have tests of\n"
        "their own in the same file.\n\n"
        "| case | command | exit | what it prints |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(f"wrote {OUT} ({len(rows)} cases)")


if __name__ == "__main__":
    main_()
