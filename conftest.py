"""Collection rules for the whole tree (tests/ and the doctests of src/crossent)."""

import importlib.util

# crossent.transformers needs the optional transformers package: without it, its doctests are not collected
# (tests/test_transformers.py skips itself with pytest.importorskip)
collect_ignore = [] if importlib.util.find_spec("transformers") else ["src/crossent/transformers.py"]
# likewise crossent.trl and the optional trl package (tests/test_trl*.py skip themselves)
collect_ignore += [] if importlib.util.find_spec("trl") else ["src/crossent/trl.py"]
