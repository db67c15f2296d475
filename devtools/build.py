"""Build the plugin's .mbp: a zip with maubot.yaml, base-config.yaml and the modules (surfaces_plugin/).

Standard library only, so `./build.sh` works with any python3, before a venv exists.
Usage: python3 -m devtools.build [--repo DIR] [--out DIR]; prints the .mbp path.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TOP_FILES = ("maubot.yaml", "base-config.yaml")


def _meta_field(meta_text: str, key: str) -> str:
    """A top-level scalar from maubot.yaml (no YAML parser needed for `key: value`)."""
    match = re.search(rf"^{key}:\s*['\"]?([^'\"#\s]+)", meta_text, re.MULTILINE)
    if not match:
        raise SystemExit(f"maubot.yaml has no top-level `{key}`")
    return match.group(1)


def _modules(meta_text: str) -> list[str]:
    """The `modules:` list of maubot.yaml (block style, `  - name` lines)."""
    block = re.search(r"^modules:\s*\n((?:[ \t]+-.*\n?)+)", meta_text, re.MULTILINE)
    if not block:
        raise SystemExit("maubot.yaml has no block-style `modules:` list")
    return re.findall(r"-\s*['\"]?([\w.]+)", block.group(1))


def _package_files(package_dir: Path) -> list[Path]:
    """Every file of the package except bytecode, in a stable order (reproducible zips)."""
    files = []
    for path in sorted(package_dir.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo"):
            continue
        files.append(path)
    return files


def _check_packages(package_dir: Path) -> None:
    """Every folder holding Python files must be a regular package: maubot's zip importer cannot
    load namespace packages (they import from a checkout, then fail in the uploaded .mbp)."""
    for folder in sorted({p.parent for p in package_dir.rglob("*.py")}):
        if "__pycache__" not in folder.parts and not (folder / "__init__.py").exists():
            raise SystemExit(
                f"{folder} has no __init__.py: the .mbp would fail to load in maubot "
                "(its zip importer does not support namespace packages)"
            )


def build(repo_root: Path = REPO_ROOT, out_dir: Path | None = None) -> Path:
    """Write build/<id>-v<version>.mbp (replacing an old one) and return its path."""
    meta = (repo_root / "maubot.yaml").read_text()
    plugin_id, version = _meta_field(meta, "id"), _meta_field(meta, "version")
    files = [repo_root / name for name in TOP_FILES]
    for module in _modules(meta):
        package = repo_root / module
        if package.is_dir():
            _check_packages(package)
            files += _package_files(package)
        else:
            files.append(repo_root / f"{module}.py")
    out_dir = out_dir or repo_root / "build"
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{plugin_id}-v{version}.mbp"
    tmp = target.with_suffix(".mbp.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in files:
            zf.write(path, path.relative_to(repo_root).as_posix())
    tmp.replace(target)  # atomic: an upload never sees a half-written file
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO_ROOT)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    print(build(args.repo.resolve(), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
