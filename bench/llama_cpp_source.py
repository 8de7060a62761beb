"""llama.cpp's source as llama-cpp-python vendors it, in build/llama.cpp-<version>.

    .venv/bin/python bench/llama_cpp_source.py   # the installed llama-cpp-python's version

The tests read its tokenizer tables (src/llama-vocab.cpp) to check emergence's against them,
and bench/bench_serve_peers.py builds its llama-server from it. Fetched from PyPI (the same
sdist pip builds llama-cpp-python from: `pip download --no-binary :all:`), once.
"""

from __future__ import annotations

import os
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


# llama.cpp's CPU backend as the Makefile builds llama-cpp-python: without its AMX matmul, which
# faults with SIGILL in OpenMP worker threads on the machines we run on.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def llama_cpp_binary(target: str, version: str | None = None) -> Path:
    """llama.cpp's own program `target` (llama-server, llama-bench) built from the vendored
    source (CMake, Release, CPU backend; several minutes the first time, then cached)."""
    source = ensure_source(version)
    binary = source / "build" / "bin" / target
    if binary.exists():
        return binary
    print(f"building {target} from llama.cpp's source in {source} (several minutes, once)", flush=True)
    subprocess.run(["cmake", "-S", str(source), "-B", str(source / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(source / "build"), "--target", target, "-j", str(os.cpu_count())],
                   check=True, stdout=subprocess.DEVNULL)
    return binary


if __name__ == "__main__":
    print(ensure_source())
