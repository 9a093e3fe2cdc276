"""``kernel-gateway image-bootstrap``: make any existing kernel image startable by our container provisioners.

Run it in a Dockerfile on top of an image that has pip (a Jupyter docker-stacks image, say)::

    FROM quay.io/jupyter/scipy-notebook:latest
    RUN pip install kernel-gateway-server && kernel-gateway image-bootstrap
    CMD ["/usr/local/share/kernel-gateway/bootstrap-kernel.sh"]

It checks that the kernel's Python (``--python``, default: the one running this command) imports
ipykernel, zmq and cryptography, then installs into ``--prefix``:

* ``launch_ipykernel.py``: the Python launcher;
* ``bootstrap-kernel.sh``: the container entry point, which starts the launcher from the environment
  the provisioner sets (KERNEL_ID, RESPONSE_ADDRESS, PUBLIC_KEY, PORT_RANGE, ...);
* ``kernel-python``: the interpreter path, which bootstrap-kernel.sh uses.

Exit status: 0 done; 1 the Python lacks a module (nothing is installed); 2 bad arguments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from traitlets import Unicode
from traitlets.config import Application

from launchers import PYTHON_LAUNCHER

__all__ = ["BOOTSTRAP_SCRIPT", "ImageBootstrapApp", "missing_modules"]

_USAGE = __doc__

BOOTSTRAP_SCRIPT = Path(PYTHON_LAUNCHER).resolve().parents[1] / "bootstrap-kernel.sh"
DEFAULT_PREFIX = "/usr/local/share/kernel-gateway"
#: Modules the launcher imports, with the pip package that provides each.
REQUIRED = {
    "ipykernel": "ipykernel",
    "zmq": "pyzmq",
    "cryptography.hazmat.primitives.asymmetric.x25519": "cryptography",
    "cryptography.hazmat.primitives.ciphers.aead": "cryptography",
    "cryptography.hazmat.primitives.kdf.hkdf": "cryptography",
}

_PROBE = """
import importlib, json, sys
missing = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        missing[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"missing": missing, "version": list(sys.version_info[:3])}))
"""


def missing_modules(python: str, timeout: float = 120.0) -> dict[str, str]:
    """Modules of :data:`REQUIRED` that ``python`` cannot import -> why; raises RuntimeError if it cannot run."""
    try:
        proc = subprocess.run([python, "-c", _PROBE, *REQUIRED], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"cannot run {python}: {exc}") from None
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"{python} did not run the import check (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()[-500:]}") from None
    if tuple(report["version"]) < (3, 8):
        return {"python>=3.8": f"{python} is Python {'.'.join(map(str, report['version']))}"}
    return report["missing"]


class ImageBootstrapApp(Application):
    """``kernel-gateway image-bootstrap``: install our launcher and entry point into a kernel image."""

    name = "kernel-gateway image-bootstrap"
    description = _USAGE

    prefix = Unicode(DEFAULT_PREFIX, config=True,
                     help="Directory for launch_ipykernel.py, bootstrap-kernel.sh and kernel-python.")
    python = Unicode("", config=True,
                     help="Python interpreter that runs the kernels (path or name on PATH); "
                          "default: the interpreter running this command.")

    aliases = {"prefix": "ImageBootstrapApp.prefix", "python": "ImageBootstrapApp.python"}
    flags: dict = {}

    def resolve_python(self) -> str:
        if not self.python:
            return sys.executable
        found = shutil.which(self.python)
        if not found:
            print(f"{self.name}: --python {self.python!r} is not an executable file or a command on PATH",
                  file=sys.stderr)
            self.exit(2)
        return os.path.abspath(found)

    def start(self) -> None:
        if self.extra_args:
            print(f"{self.name}: unexpected arguments {self.extra_args}; options: --prefix, --python",
                  file=sys.stderr)
            self.exit(2)
        python = self.resolve_python()
        try:
            missing = missing_modules(python)
        except RuntimeError as exc:
            print(f"{self.name}: {exc}", file=sys.stderr)
            self.exit(1)
        if missing:
            packages = sorted({REQUIRED.get(name, name) for name in missing})
            details = "\n".join(f"  {name}: {why}" for name, why in sorted(missing.items()))
            print(f"{self.name}: {python} cannot import what kernels need (missing: {', '.join(packages)}):\n"
                  f"{details}\nInstall them into that environment, e.g.: "
                  f"{python} -m pip install {' '.join(packages)}\nNothing was installed.", file=sys.stderr)
            self.exit(1)
        prefix = Path(self.prefix)
        try:
            prefix.mkdir(parents=True, exist_ok=True)
            for source in (PYTHON_LAUNCHER, BOOTSTRAP_SCRIPT):
                target = prefix / Path(source).name
                shutil.copyfile(source, target)
                target.chmod(0o755)
            (prefix / "kernel-python").write_text(python + "\n")
            (prefix / "kernel-python").chmod(0o644)
        except OSError as exc:
            print(f"{self.name}: cannot install into {prefix}: {exc}", file=sys.stderr)
            self.exit(1)
        print(f"installed {prefix}/launch_ipykernel.py and {prefix}/bootstrap-kernel.sh (kernel Python: {python}); "
              f"start kernels with {prefix}/bootstrap-kernel.sh")


main = ImageBootstrapApp.launch_instance

if __name__ == "__main__":
    main()
