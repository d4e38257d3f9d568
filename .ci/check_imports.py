"""Import every public module in an environment without extras.

A module that needs an extra must fail with an ImportError that names the extra
(``pip install 'rag_instrument[...]'``), never with a bare ModuleNotFoundError.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import rag_instrument

failures = []
checked = 0
for info in pkgutil.walk_packages(rag_instrument.__path__, "rag_instrument."):
    if any(part.startswith("_") for part in info.name.split(".")[1:]):
        continue
    if info.name == "rag_instrument.pytest_plugin":
        continue  # loaded by pytest itself (an entry point), so pytest is always there
    checked += 1
    try:
        importlib.import_module(info.name)
    except ImportError as exc:
        if "pip install 'rag_instrument[" not in str(exc):
            failures.append(f"{info.name}: {exc!r}")
for name in rag_instrument.__all__:
    try:
        getattr(rag_instrument, name)
    except ImportError as exc:
        if "pip install 'rag_instrument[" not in str(exc):
            failures.append(f"rag_instrument.{name}: {exc!r}")
if failures:
    print("imports without extras failed:\n  " + "\n  ".join(failures))
    sys.exit(1)
names = len(rag_instrument.__all__)
print(f"{checked} public modules and {names} names import cleanly or name their extra")
