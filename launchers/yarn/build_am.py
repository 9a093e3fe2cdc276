"""Builder of the ApplicationMaster jar: ``mvn package`` once per hash of its sources, cached on disk.

The jar lands in ``${KGW_CACHE_DIR:-/var/cache/kgw}/yarn-am/<hash>/kgw-yarn-am.jar``; a second call with
unchanged sources returns that path without running Maven. Maven's own downloads go to ``~/.m2`` as
usual, and its ``target/`` directory is kept out of the source tree. Concurrent callers (several pytest
processes) are serialised by an ``flock`` in the cache directory.

Run directly to build and print the path::

    python3 launchers/yarn/build_am.py [--force]
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

#: The ApplicationMaster's main class: ``java -cp <jar>:<hadoop classpath> AM_MAIN_CLASS [options] -- cmd...``.
AM_MAIN_CLASS = "kernelgateway.yarn.YarnAmWrapper"
JAR_NAME = "kgw-yarn-am.jar"
SOURCE_DIR = Path(__file__).resolve().parent


def sources_hash(root: Path = SOURCE_DIR) -> str:
    """sha256 over ``pom.xml`` and every file under ``src/`` (paths and contents); 16 hex digits."""
    digest = hashlib.sha256()
    files = [root / "pom.xml"] + sorted(p for p in (root / "src").rglob("*") if p.is_file())
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("KGW_CACHE_DIR") or "/var/cache/kgw") / "yarn-am"


def build_am_jar(cache_dir: Path | None = None, force: bool = False, timeout: float = 600.0) -> Path:
    """Path of the ApplicationMaster jar, built with Maven unless a build of the same sources exists.

    Raises ``RuntimeError`` with Maven's output when the build fails, ``FileNotFoundError`` when ``mvn``
    is not installed, ``subprocess.TimeoutExpired`` after ``timeout`` seconds.
    """
    cache_dir = cache_dir or default_cache_dir()
    target = cache_dir / sources_hash() / JAR_NAME
    if target.is_file() and not force:
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise FileNotFoundError("building the YARN ApplicationMaster needs Maven ('mvn' is not on PATH)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same jar right now
        if target.is_file() and not force:
            return target
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as build_dir:
            cmd = [mvn, "-B", "-q", "-f", str(SOURCE_DIR / "pom.xml"), "package", f"-Dam.build.dir={build_dir}"]
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
            built = Path(build_dir) / JAR_NAME
            if proc.returncode or not built.is_file():
                output = (proc.stdout + proc.stderr)[-4000:]
                raise RuntimeError(f"building the YARN ApplicationMaster failed ({proc.returncode}):\n{output}")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(built, target)
    return target


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build the kernel gateway's YARN ApplicationMaster jar.")
    parser.add_argument("--force", action="store_true", help="rebuild even when a jar of these sources exists")
    parser.add_argument("--cache-dir", type=Path, help="default: ${KGW_CACHE_DIR:-/var/cache/kgw}/yarn-am")
    args = parser.parse_args(argv)
    print(build_am_jar(args.cache_dir, force=args.force))


if __name__ == "__main__":
    main()
