"""BUILD names every Python file of the repository, and only files that exist."""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIRS = ("bonsai_tf", "train", "export", "bench", "tests")


def build_text():
    with open(os.path.join(ROOT, "BUILD")) as f:
        return f.read()


def named_sources(text):
    return set(re.findall(r'"([\w/.-]+\.py)"', text))


def test_every_python_file_has_a_target():
    files = {os.path.relpath(p, ROOT) for d in DIRS
             for p in glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True)}
    missing = sorted(files - named_sources(build_text()))
    assert not missing, f"add BUILD targets for {missing}"


def test_every_named_file_exists():
    gone = sorted(p for p in named_sources(build_text()) if not os.path.exists(os.path.join(ROOT, p)))
    assert not gone, f"BUILD names files that do not exist: {gone}"


def test_each_test_file_is_a_py_test_and_deps_are_defined():
    text = build_text()
    for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py")):
        rel = os.path.relpath(path, ROOT)
        assert re.search(r'py_test\([^)]*srcs = \["%s"\]' % re.escape(rel), text), rel
    names = set(re.findall(r'name = "([\w-]+)"', text))
    for dep in re.findall(r'":([\w-]+)"', text):
        assert dep in names, f"dependency :{dep} is not a target"
