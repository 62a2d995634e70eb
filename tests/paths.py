"""Where the tests find the repository, whatever folder of tests/ a test file sits in.

tests/ is on sys.path (pyproject's [tool.pytest.ini_options] pythonpath), so a test says
`from paths import ROOT, DATA` instead of counting its own depth with dirname/parents[n].
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent  # tests/: the shared helpers (tool_modules, tvm_kernels)
ROOT = TESTS.parent  # the repository
DATA = TESTS / "data"  # test data shipped in the repository
EXPECT = TESTS / "expect"  # recorded expectations (public API surface)
TOOLS = ROOT / "tools"
EXAMPLES = ROOT / "examples"
CORPUS_CACHE = ROOT / ".cache" / "corpus"  # tools/make_corpus.py's exports, when present
