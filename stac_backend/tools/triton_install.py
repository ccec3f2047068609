"""Locate the genuine NVIDIA ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel and prepare
what it needs to run on a plain Linux machine (no Docker, no GPU).

The wheel ships a real Triton Inference Server binary with its Python backend and one
Python-backend stub per interpreter version::

    <site-packages>/pytriton/tritonserver/bin/tritonserver
    <site-packages>/pytriton/tritonserver/backends/python/{libtriton_python.so, triton_python_backend_utils.py}
    <site-packages>/pytriton/tritonserver/python_backend_stubs/<major.minor>/triton_python_backend_stub
    <site-packages>/nvidia_pytriton.libs/          (auditwheel-grafted shared libraries)

pytriton's own launcher assumes its proxy backend; ours serves a plain model repository, so this
module does what pytriton's utilities do not:

* It builds a backend directory in a cache folder (site-packages is never modified) with
  the bundled backends and the stub that matches the running interpreter.
* It puts ``nvidia_pytriton.libs`` and the running interpreter's ``libpython3.X.so.1.0``
  on ``LD_LIBRARY_PATH`` (the copied binaries' ``$ORIGIN`` RPATH no longer points at the
  wheel, and the stub must embed the *same* Python build as the launcher). A small ELF reader
  finds which libpython name a stub asks for: the 3.13 stub of nvidia-pytriton 0.7.0 asks for an
  auditwheel-renamed one, which is aliased to the running interpreter's (no binutils needed).
* It makes the stub's embedded interpreter *be* the launcher's virtualenv. The stub runs
  Python in isolated mode (``sys.flags.isolated == 1``: ``PYTHONPATH``, ``PYTHONHOME`` and
  the user site are ignored) and finds its ``sys.executable`` by looking ``python3`` up on
  ``PATH``; a ``python3`` next to a ``pyvenv.cfg`` makes it a venv interpreter, with the
  venv's site-packages and ``.pth`` files (editable installs). So the folder holding the
  running interpreter's ``python3`` goes first on ``PATH``. (Whatever ``python3`` comes
  first otherwise wins: ``/usr/bin/python3`` makes a pyenv-built stub load Debian's
  stdlib and fail with ``No module named '_struct'``.)

``stac_backend.tools.tritonserver.TritonServer`` starts, watches and stops the server.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

__all__ = [
    "TritonServerError",
    "TritonInstall",
    "LibPython",
    "PreparedBackends",
    "find_triton_install",
    "find_libpython",
    "prepare_backend_directory",
    "stub_python_dir",
    "check_stub_numpy",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

#: Overrides the cache folder that holds the prepared backend directories.
CACHE_DIR_ENV = "STAC_TRITON_CACHE_DIR"

MODEL_CONTROL_MODES = ("none", "poll", "explicit")
LOG_PREFIX = "[triton] "


class TritonServerError(RuntimeError):
    """Triton could not be located, prepared, started or stopped.

    ``log_tail`` holds the last lines the server printed (empty if it never ran).
    """

    def __init__(self, message: str, log_tail: Sequence[str] = ()):
        self.log_tail = list(log_tail)
        if self.log_tail:
            message = f"{message}\n--- last {len(self.log_tail)} tritonserver log lines ---\n" + "\n".join(
                self.log_tail
            )
        super().__init__(message)


# --------------------------------------------------------------------------------------
# Locating the bundled server
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TritonInstall:
    """Where the files of the installed ``nvidia-pytriton`` wheel are."""

    root: Path  # .../site-packages/pytriton/tritonserver
    binary: Path  # root/bin/tritonserver
    backends_dir: Path  # root/backends
    stubs_dir: Path  # root/python_backend_stubs
    caches_dir: Optional[Path]  # root/caches (response-cache plugins), if present
    libs_dir: Optional[Path]  # site-packages/nvidia_pytriton.libs, if present
    package_version: str

    def stub_versions(self) -> list[str]:
        """Python versions (``"3.11"``...) for which the wheel ships a backend stub."""
        if not self.stubs_dir.is_dir():
            return []
        found = [p.name for p in self.stubs_dir.iterdir() if (p / "triton_python_backend_stub").is_file()]
        return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()))

    def stub_for(self, python_version: str) -> Path:
        """The stub for ``python_version`` (``"3.11"``); raises if the wheel has none."""
        stub = self.stubs_dir / python_version / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonServerError(
                f"Python {python_version} is not supported by the Triton Python backend bundled in "
                f"nvidia-pytriton {self.package_version}: it ships stubs for "
                f"{', '.join(self.stub_versions()) or 'no Python version'} (looked in {self.stubs_dir}). "
                "Run the project with one of those interpreters."
            )
        return stub


def find_triton_install() -> TritonInstall:
    """Locate ``tritonserver`` and its bundled backends in the installed nvidia-pytriton wheel.

    Only import machinery is used (``importlib.util.find_spec``), so the pytriton package
    itself is not imported (importing it pulls in a lot and may log).
    """
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "nvidia-pytriton is not installed: `pip install nvidia-pytriton==0.7.0` "
            "(it bundles the tritonserver binary and its Python backend)."
        )
    for location in spec.submodule_search_locations:
        root = Path(location) / "tritonserver"
        binary = root / "bin" / "tritonserver"
        if binary.is_file():
            break
    else:
        raise TritonServerError(
            f"the installed pytriton package ({list(spec.submodule_search_locations)}) has no "
            "tritonserver/bin/tritonserver; reinstall the binary wheel: "
            "`pip install --force-reinstall --no-deps nvidia-pytriton==0.7.0`."
        )
    if not os.access(binary, os.X_OK):
        raise TritonServerError(f"{binary} is not executable")

    site_dir = root.parent.parent
    libs_dir = site_dir / "nvidia_pytriton.libs"
    caches_dir = root / "caches"
    try:
        from importlib.metadata import version

        package_version = version("nvidia-pytriton")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        package_version = "unknown"
    return TritonInstall(
        root=root,
        binary=binary,
        backends_dir=root / "backends",
        stubs_dir=root / "python_backend_stubs",
        caches_dir=caches_dir if caches_dir.is_dir() else None,
        libs_dir=libs_dir if libs_dir.is_dir() else None,
        package_version=package_version,
    )


# --------------------------------------------------------------------------------------
# libpython for the stub
# --------------------------------------------------------------------------------------


def elf_needed(path: PathLike) -> Optional[list[str]]:
    """``DT_NEEDED`` entries of a 64-bit little-endian ELF file, or None if unreadable.

    A tiny reader (no binutils needed): finds the SHT_DYNAMIC section and its string table.
    """
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    e_shoff, = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = []
    for i in range(e_shnum):
        off = e_shoff + i * e_shentsize
        if off + 64 > len(data):
            return None
        sh_type, = struct.unpack_from("<I", data, off + 4)
        sh_offset, sh_size = struct.unpack_from("<QQ", data, off + 0x18)
        sh_link, = struct.unpack_from("<I", data, off + 0x28)
        sections.append((sh_type, sh_offset, sh_size, sh_link))
    for sh_type, sh_offset, sh_size, sh_link in sections:
        if sh_type != 6:  # SHT_DYNAMIC
            continue
        if sh_link >= len(sections):
            return None
        str_off = sections[sh_link][1]
        needed = []
        for pos in range(sh_offset, sh_offset + sh_size, 16):
            tag, val = struct.unpack_from("<qQ", data, pos)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", str_off + val)
                needed.append(data[str_off + val : end].decode())
        return needed
    return None


@dataclass(frozen=True)
class LibPython:
    """The shared libpython the stub will load."""

    soname: str  # e.g. libpython3.11.so.1.0
    path: Optional[Path]  # the file, when known
    directory: Optional[Path]  # to prepend to LD_LIBRARY_PATH (None: the loader finds it itself)
    same_build: bool  # True: it belongs to the running interpreter


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _libpython_install_hint(version: str) -> str:
    full = sys.version.split()[0] if version == _python_version() else f"{version}.<patch>"
    return (
        f"The Triton Python backend stub links against the shared library libpython{version}.so.1.0. "
        f"Use a Python {version} built with --enable-shared: with pyenv, "
        f"`env PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install --force {full}` "
        "(then recreate the virtualenv); with the distribution's Python on Debian/Ubuntu, "
        f"`apt-get install libpython{version}` (only where the release packages Python {version}; "
        "Debian 12 has 3.11, Ubuntu 24.04 has 3.12)."
    )


def _system_loader_finds(soname: str) -> Optional[Path]:
    """Path of ``soname`` known to the dynamic loader's cache (``ldconfig -p``), if any."""
    for ldconfig in ("/sbin/ldconfig", "/usr/sbin/ldconfig", shutil.which("ldconfig")):
        if not ldconfig or not os.path.exists(ldconfig):
            continue
        try:
            out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        want_x86_64 = os.uname().machine == "x86_64"
        for line in out.splitlines():
            line = line.strip()
            if not line.startswith(soname + " (") or "=>" not in line:
                continue
            if want_x86_64 and "x86-64" not in line:
                continue  # e.g. an i386 multilib copy
            return Path(line.rsplit("=>", 1)[-1].strip())
        break
    for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
        if os.path.exists(os.path.join(d, soname)):
            return Path(d, soname)
    return None


def find_libpython(version: Optional[str] = None) -> LibPython:
    """Find ``libpython<major.minor>.so.1.0`` for the stub, preferring the running interpreter's.

    Order: ``sysconfig LIBDIR`` (pyenv/python.org builds with ``--enable-shared`` keep it
    there, outside the loader's default path), ``sys.base_prefix/lib``, then the system
    loader (e.g. Debian's ``libpython3.11`` package). The last one works but is a different
    build from the launcher's interpreter (its own stdlib and prefix); a warning is logged.
    Raises :class:`TritonServerError` with an install hint when there is none.
    """
    version = version or _python_version()
    soname = f"libpython{version}.so.1.0"
    candidates = []
    if version == _python_version():
        for var in ("LIBDIR", "LIBPL"):
            d = sysconfig.get_config_var(var)
            if d:
                candidates.append(Path(d))
        candidates.append(Path(sys.base_prefix) / "lib")
    for d in candidates:
        if (d / soname).exists():
            return LibPython(soname, (d / soname).resolve(), d, same_build=True)
    system = _system_loader_finds(soname)
    if system is not None:
        if version == _python_version():
            log.warning(
                "%s of the running interpreter (%s) was not found; the Triton Python stub will use %s, "
                "another build of Python %s with its own standard library. %s",
                soname, sys.executable, system, version, _libpython_install_hint(version),
            )
        return LibPython(soname, system, system.parent, same_build=False)
    raise TritonServerError(f"{soname} not found for {sys.executable}. {_libpython_install_hint(version)}")


# --------------------------------------------------------------------------------------
# The stub's Python environment
# --------------------------------------------------------------------------------------


def stub_python_dir() -> Path:
    """The folder whose ``python3`` the Python-backend stub must find first on ``PATH``.

    The stub embeds libpython in isolated mode and derives ``sys.executable`` /
    ``sys.prefix`` from the first ``python3`` on ``PATH``; for a virtualenv's ``bin/``
    that means the venv (``pyvenv.cfg``) with all its packages. ``sys.executable`` is
    kept unresolved by Python, so for a venv this is the venv's ``bin``.
    """
    candidates = [Path(sys.executable).parent, Path(sys.prefix) / "bin"]
    for d in candidates:
        if os.access(d / "python3", os.X_OK):
            return d
    raise TritonServerError(
        f"no executable `python3` in {' or '.join(map(str, candidates))}: the Triton Python stub finds "
        "its environment by looking up `python3` on PATH, so the interpreter that launches tritonserver "
        "must have one beside it (virtualenvs and pyenv/python.org installs do)."
    )


def check_stub_numpy() -> Optional[str]:
    """Refuse numpy >= 2 in the environment the stub will use; return the numpy version.

    Measured with nvidia-pytriton 0.7.0 (Triton 2.51 Python backend) and numpy 2.4 in the
    stub's environment: ``pb_utils.Tensor(name, ndarray)`` outputs reach the client with the
    right shape but *no data* (empty ``raw_output_contents``) and ``Tensor.as_numpy()`` inputs
    give wrong results, silently; the DLPack paths (``Tensor.from_dlpack`` /
    ``np.from_dlpack(tensor)`` / ``to_dlpack``) work. nvidia-pytriton pins ``numpy<2``; an
    environment that overrides the pin (``pip install --no-deps``, a later upgrade) would
    serve garbage.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        numpy_version = version("numpy")
    except PackageNotFoundError:
        raise TritonServerError(
            "numpy is not installed in this environment; the Triton Python backend stub needs it "
            "(`pip install 'numpy<2'`)."
        ) from None
    major = int(re.match(r"\d+", numpy_version).group(0)) if re.match(r"\d+", numpy_version) else 0
    if major >= 2:
        raise TritonServerError(
            f"numpy {numpy_version} is installed, but with numpy 2 the Python backend bundled in "
            "nvidia-pytriton 0.7.0 returns empty outputs for pb_utils.Tensor(name, ndarray) and misreads "
            "Tensor.as_numpy() inputs (measured). Install `numpy<2` (nvidia-pytriton requires it; "
            "`pip install --no-deps nvidia-pytriton` skips that pin), or pass check_numpy=False if every "
            "model moves tensors only through DLPack (from_dlpack/to_dlpack work with numpy 2)."
        )
    return numpy_version


# --------------------------------------------------------------------------------------
# The prepared backend directory
# --------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stac_backend" / "tritonserver"


@dataclass(frozen=True)
class PreparedBackends:
    """A backend directory ready for ``--backend-directory`` plus what the stub needs."""

    root: Path  # the cache entry
    backend_directory: Path  # root/backends
    lib_dir: Path  # root/lib: libpython aliases (first on LD_LIBRARY_PATH)
    libpython: LibPython
    python_version: str


def _file_fingerprint(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _copy_backend_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=False, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def prepare_backend_directory(
    install: Optional[TritonInstall] = None,
    cache_dir: Optional[PathLike] = None,
    python_version: Optional[str] = None,
) -> PreparedBackends:
    """Build (once, cached) a backend directory with the stub for the running interpreter.

    Layout of the cache entry::

        backends/<name>/...                        every backend bundled in the wheel
        backends/python/triton_python_backend_stub the stub for <major.minor>
        lib/                                       symlinks for libpython names the stub needs

    The entry is built in a temporary folder and renamed into place, so concurrent
    launchers (pytest-xdist workers) are safe. Nothing under site-packages is modified.
    """
    install = install or find_triton_install()
    python_version = python_version or _python_version()
    stub = install.stub_for(python_version)  # raises for unsupported versions
    libpython = find_libpython(python_version)

    sources = [install.binary, stub] + [p for p in install.backends_dir.rglob("*") if p.is_file()]
    key_src = "|".join(
        [
            install.package_version,
            python_version,
            str(libpython.path),
            _file_fingerprint(s for s in sources if "__pycache__" not in s.parts),
        ]
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    name = f"pytriton-{install.package_version}-py{python_version}-{key}"

    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=cache_root, prefix=".probe-")
        probe.close()
    except OSError:
        if cache_dir is not None:
            raise
        cache_root = Path(tempfile.gettempdir()) / f"stac_backend-tritonserver-{os.getuid()}"
        cache_root.mkdir(parents=True, exist_ok=True)

    final = cache_root / name
    prepared = PreparedBackends(
        root=final,
        backend_directory=final / "backends",
        lib_dir=final / "lib",
        libpython=libpython,
        python_version=python_version,
    )
    if (final / ".complete").is_file():
        return prepared

    tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".{name}-"))
    os.chmod(tmp, 0o755)
    try:
        backends = tmp / "backends"
        backends.mkdir()
        if install.backends_dir.is_dir():
            for entry in install.backends_dir.iterdir():
                if entry.is_dir() and entry.name != "__pycache__":
                    _copy_backend_tree(entry, backends / entry.name)
        python_dir = backends / "python"
        python_dir.mkdir(exist_ok=True)
        shutil.copy2(stub, python_dir / "triton_python_backend_stub")
        os.chmod(python_dir / "triton_python_backend_stub", 0o755)

        # The stub's DT_NEEDED may name a libpython other than the standard soname
        # (nvidia-pytriton 0.7.0's 3.13 stub needs libpython3-419a3a08.13.so.1.0, an
        # auditwheel-renamed build bundled in nvidia_pytriton.libs). Alias every libpython
        # name it needs to the running interpreter's, found first via LD_LIBRARY_PATH.
        lib_dir = tmp / "lib"
        lib_dir.mkdir()
        needed = elf_needed(stub) or []
        for soname in needed:
            if soname.startswith("libpython") and soname != libpython.soname and libpython.path is not None:
                os.symlink(libpython.path, lib_dir / soname)

        (tmp / "SOURCE").write_text(
            f"nvidia-pytriton {install.package_version}\nroot {install.root}\nstub {stub}\n"
            f"libpython {libpython.path}\nstub needs {needed}\n"
        )
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, final)
        except OSError:
            # Someone else finished first (or a broken leftover is there).
            if (final / ".complete").is_file():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return prepared
