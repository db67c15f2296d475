"""The plugin loads in a maubot without `maubot[encryption]` (no python-olm, no pycryptodome)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Blocks the crypto packages the way a missing install does (ImportError), then imports every
# module of the plugin.
PROBE = """
import importlib, pkgutil, sys
for name in ("olm", "Crypto", "Cryptodome", "unpaddedbase64", "base58"):
    sys.modules[name] = None
import surfaces_plugin
for module in pkgutil.walk_packages(surfaces_plugin.__path__, "surfaces_plugin."):
    importlib.import_module(module.name)
print("every plugin module imported")
import mautrix.crypto  # the blocking must be real: this import has to fail
"""


def test_every_plugin_module_imports_without_the_crypto_packages() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "every plugin module imported" in result.stdout, result.stderr
    assert "import of olm halted" in result.stderr, "the packages were not blocked"
