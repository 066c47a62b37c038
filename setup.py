"""Build driver: runs the CMake graph (CMakeLists.txt) and places stackwise._C in python/stackwise/.

CMake holds every source, flag and test; this file only configures, builds and copies. The build
folder persists (build/<python tag> unless STACKWISE_BUILD_DIR is set), so a second install
rebuilds only what changed.

The configuration library has one source, configs/ (the YAML recipes and their README); build_py
copies it into the built package as stackwise/configs/, so a wheel or `pip install .` carries it
(stackwise.config.library reads it there, or configs/ itself in a checkout), and MANIFEST.in puts
it in the sdist.

Knobs (environment): STACKWISE_BUILD_CUDA=auto|0|1, TORCH_CUDA_ARCH_LIST (default 9.0a),
MAX_JOBS, CMAKE_BUILD_TYPE (default Release), STACKWISE_BUILD_DIR, CUDA_HOME.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _build_dir() -> Path:
    custom = os.environ.get("STACKWISE_BUILD_DIR")
    if custom:
        return Path(custom).resolve()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return ROOT / "build" / tag


def _cmake() -> str:
    # The PyPI cmake (a build requirement) is new enough for C++20 CUDA; Debian's 3.25 is not.
    try:
        import cmake  # type: ignore[import-not-found]

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        found = shutil.which("cmake")
        if not found:
            raise RuntimeError("stackwise: cmake not found; pip install 'cmake>=3.26'") from None
        return found


def _generator_args() -> list[str]:
    try:
        import ninja  # type: ignore[import-not-found]

        return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}"]
    except ImportError:
        return ["-G", "Ninja"] if shutil.which("ninja") else []


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        build_dir = _build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _cmake()
        if not (build_dir / "CMakeCache.txt").exists():
            cfg = [
                cmake,
                "-S",
                str(ROOT),
                "-B",
                str(build_dir),
                f"-DPython3_EXECUTABLE={sys.executable}",
                f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
                *_generator_args(),
            ]
            subprocess.run(cfg, check=True)
        else:
            # Re-read the knobs that change the graph; CMake re-runs its configure step itself
            # when a CMakeLists.txt changed.
            subprocess.run(
                [
                    cmake,
                    str(build_dir),
                    f"-DSTACKWISE_BUILD_CUDA={os.environ.get('STACKWISE_BUILD_CUDA', 'auto')}",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)

        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        built = build_dir / f"_C{suffix}"
        if not built.exists():
            raise RuntimeError(f"stackwise: the build did not produce {built}")
        targets = {
            ROOT / "python" / "stackwise" / built.name,
            Path(self.get_ext_fullpath(ext.name)),
        }
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            shutil.copy2(built, tmp)
            os.replace(tmp, target)


CONFIG_FILES = ("*.yaml", "README.md")


class BuildPyWithConfigs(build_py):
    """build_py, plus the configuration library copied from configs/ into stackwise/configs/."""

    def run(self) -> None:
        super().run()
        source = ROOT / "configs"
        files = sorted(p for pattern in CONFIG_FILES for p in source.glob(pattern))
        if not any(p.suffix == ".yaml" for p in files):
            raise RuntimeError(f"stackwise: no configurations in {source} to package")
        target = Path(self.build_lib) / "stackwise" / "configs"
        target.mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copy2(path, target / path.name)


setup(
    ext_modules=[CMakeExtension("stackwise._C")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithConfigs},
)
