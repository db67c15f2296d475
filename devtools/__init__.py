"""Development tools: a real Synapse, maubot (standalone and full server), a test client, the build.

Used by the e2e tests, the local demo and the benchmarks; never shipped in the .mbp.
"""

from pathlib import Path

# The repository root, so tools work from any working directory.
REPO_ROOT = Path(__file__).resolve().parent.parent
