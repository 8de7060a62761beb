"""llama.cpp's source as llama-cpp-python vendors it, in build/llama.cpp-<version>.

    .venv/bin/python bench/llama_cpp_source.py   # the installed llama-cpp-python's version

The tests read its tokenizer tables (src/llama-vocab.cpp) to check emergence's against them,
and bench/bench_serve_peers.py builds its llama-server from it. Fetched from PyPI (the same
sdist pip builds llama-cpp-python from: `pip download --no-binary :all:`), once.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def installed_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def source_dir(version: str | None = None) -> Path:
    return ROOT / "build" / f"llama.cpp-{version or installed_version()}"


def ensure_source(version: str | None = None) -> Path:
    """The folder of llama.cpp's source vendored by llama-cpp-python `version` (default: the installed one)."""
    version = version or installed_version()
    target = source_dir(version)
    if (target / "src" / "llama-vocab.cpp").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching llama.cpp's source from the llama-cpp-python {version} sdist into {target}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
                        f"llama-cpp-python=={version}"], check=True)
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        shutil.unpack_archive(str(archive), tmp)
        vendored = Path(tmp) / archive.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(vendored, target, symlinks=True)
        if (target / ".git").is_file():  # a submodule's pointer into the sdist's absent .git
            (target / ".git").unlink()
    return target


if __name__ == "__main__":
    print(ensure_source())
