"""Launch the genuine NVIDIA ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel.

The ``nvidia-pytriton`` wheel ships a real Triton Inference Server binary together with
its Python backend and one Python-backend stub per interpreter version::

    <site-packages>/pytriton/tritonserver/bin/tritonserver
    <site-packages>/pytriton/tritonserver/backends/python/{libtriton_python.so, triton_python_backend_utils.py}
    <site-packages>/pytriton/tritonserver/python_backend_stubs/<major.minor>/triton_python_backend_stub
    <site-packages>/nvidia_pytriton.libs/          (auditwheel-grafted shared libraries)

This module turns that into a server that runs on a plain Linux machine, without Docker
and without a GPU:

* It builds a backend directory in a cache folder (site-packages is never modified) with
  the bundled backends and the stub that matches the running interpreter.
* It puts ``nvidia_pytriton.libs`` and the running interpreter's ``libpython3.X.so.1.0``
  on ``LD_LIBRARY_PATH`` (the copied binaries' ``$ORIGIN`` RPATH no longer points at the
  wheel, and the stub must embed the *same* Python build as the launcher).
* It makes the stub's embedded interpreter *be* the launcher's virtualenv. The stub runs
  Python in isolated mode (``sys.flags.isolated == 1``: ``PYTHONPATH``, ``PYTHONHOME`` and
  the user site are ignored) and finds its ``sys.executable`` by looking ``python3`` up on
  ``PATH``; a ``python3`` next to a ``pyvenv.cfg`` makes it a venv interpreter, with the
  venv's site-packages and ``.pth`` files (editable installs). So the folder holding the
  running interpreter's ``python3`` goes first on ``PATH``. (Whatever ``python3`` comes
  first otherwise wins: ``/usr/bin/python3`` makes a pyenv-built stub load Debian's
  stdlib and fail with ``No module named '_struct'``.)
* :class:`TritonServer` starts the binary in its own process group, forwards its log
  lines, polls ``/v2/health/ready`` and stops it with SIGINT -> SIGTERM -> SIGKILL.

Example::

    from stac_backend.serving.tritonserver import TritonServer

    with TritonServer("model_repository", log_callback=print) as server:
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
        ...

Run ``python -m stac_backend.serving.tritonserver --help`` for a command-line front end.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

__all__ = [
    "TritonServer",
    "TritonServerError",
    "TritonInstall",
    "LibPython",
    "find_triton_install",
    "find_libpython",
    "prepare_backend_directory",
    "stub_python_dir",
    "check_stub_numpy",
    "pick_free_ports",
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


# --------------------------------------------------------------------------------------
# Ports and URLs
# --------------------------------------------------------------------------------------


def pick_free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that are free right now on ``host`` (the OS picks them).

    There is an unavoidable window before tritonserver binds them; :class:`TritonServer`
    retries with new ports when its start fails because a port was taken.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------

_BIND_FAILURE = re.compile(r"already in use|address in use|failed to (start|bind)|bind .*failed", re.I)
_SERVICE_STARTED = re.compile(r"Started (GRPCInferenceService|HTTPService|Metrics Service) at ")


def _flag_value(args: Sequence[str], flag: str) -> Optional[str]:
    """Last value given to ``--flag=value`` / ``--flag value`` in ``args``."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
        elif arg == flag and i + 1 < len(args):
            value = args[i + 1]
    return value


def _is_false(value: Optional[str]) -> bool:
    return value is not None and value.strip().lower() in ("0", "false", "no", "off")


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like the server; ignores TIME_WAIT
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _setpriv_pdeathsig() -> list[str]:
    """Prefix that makes the child get SIGTERM when the launching thread dies (util-linux)."""
    setpriv = shutil.which("setpriv")
    if not setpriv:
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


def _kill_process_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _process_group_alive(pgid: int) -> bool:
    return _kill_process_group(pgid, 0)


def _emergency_stop(proc: subprocess.Popen) -> None:
    """Finalizer: the TritonServer object was collected (or the interpreter exits) while running."""
    if proc.poll() is None:
        _kill_process_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
    _kill_process_group(proc.pid, signal.SIGKILL)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


class TritonServer:
    """A ``tritonserver`` subprocess from the nvidia-pytriton wheel.

    Args:
        model_repository: one folder or several (``--model-repository`` each).
        http_port, grpc_port, metrics_port: 0 or None picks a free port.
        host: address the three endpoints bind to; loopback by default (Triton's own
            default is 0.0.0.0).
        model_control_mode: ``"none"`` (default: the model set is fixed at start and the
            load/unload API is refused), ``"poll"`` or ``"explicit"``.
        log_verbose: Triton's ``--log-verbose`` level (0 = off).
        backend_config: extra ``--backend-config`` values, ``{"python": {"key": value}}``.
        shm_default_byte_size, shm_growth_byte_size: shortcuts for the Python backend's
            shared memory to each stub (Triton defaults: 1 MiB, growing in 1 MiB steps).
        extra_args: appended verbatim to the command line.
        env: extra environment variables for the server (and so for the stubs).
        log_file: the server's stdout+stderr lines are appended to this file.
        log_callback: called with every line, prefixed with ``"[triton] "``.
            With neither, lines go to this module's logger at DEBUG level.
        cache_dir: where the prepared backend directory is kept (default
            ``$STAC_TRITON_CACHE_DIR`` or ``~/.cache/stac_backend/tritonserver``).
        exit_timeout_s: Triton's ``--exit-timeout-secs`` (default 30): how long a graceful
            stop waits for in-flight work. Live sequences count: a stop waits until they end
            or hit ``max_sequence_idle_microseconds``.
        check_numpy: refuse to start when numpy >= 2 is installed (the bundled Python
            backend's numpy conversions then corrupt data; see :func:`check_stub_numpy`).
            Default: on, unless ``$STAC_TRITON_CHECK_NUMPY=0``. Pass False for repositories
            whose models move tensors only through DLPack, as the ``stac`` model does.
        die_with_parent: run the binary under ``setpriv --pdeathsig TERM`` so it gets SIGTERM
            if the *thread* that called :meth:`start` dies (e.g. pytest killed by a CI
            timeout). Leave False when starting from a short-lived worker thread.
        startup_timeout: used by ``with TritonServer(...)`` for :meth:`wait_ready`.

    ``with TritonServer(...) as s`` starts the server, waits until ready (retrying with new
    ports if auto-picked ports were taken meanwhile), and always stops it on exit. The
    process is also killed if the object is garbage-collected or the interpreter exits.
    """

    def __init__(
        self,
        model_repository: Union[PathLike, Sequence[PathLike]],
        *,
        http_port: Optional[int] = 0,
        grpc_port: Optional[int] = 0,
        metrics_port: Optional[int] = 0,
        host: str = "127.0.0.1",
        model_control_mode: str = "none",
        log_verbose: int = 0,
        backend_config: Optional[Mapping[str, Mapping[str, object]]] = None,
        shm_default_byte_size: Optional[int] = None,
        shm_growth_byte_size: Optional[int] = None,
        extra_args: Sequence[str] = (),
        env: Optional[Mapping[str, str]] = None,
        log_file: Optional[PathLike] = None,
        log_callback: Optional[Callable[[str], None]] = None,
        cache_dir: Optional[PathLike] = None,
        exit_timeout_s: Optional[int] = None,
        check_numpy: Optional[bool] = None,
        die_with_parent: bool = False,
        startup_timeout: float = 180.0,
        install: Optional[TritonInstall] = None,
    ):
        if isinstance(model_repository, (str, os.PathLike)):
            model_repository = [model_repository]
        self.model_repositories = [Path(p).resolve() for p in model_repository]
        for repo in self.model_repositories:
            if not repo.is_dir():
                raise TritonServerError(f"model repository {repo} is not a folder")
        if model_control_mode not in MODEL_CONTROL_MODES:
            raise ValueError(f"model_control_mode must be one of {MODEL_CONTROL_MODES}, got {model_control_mode!r}")
        self.host = host
        self._requested_ports = {"http": http_port or 0, "grpc": grpc_port or 0, "metrics": metrics_port or 0}
        self.ports: dict[str, int] = {}
        self.model_control_mode = model_control_mode
        self.log_verbose = int(log_verbose)
        config: dict[str, dict[str, object]] = {k: dict(v) for k, v in (backend_config or {}).items()}
        if shm_default_byte_size is not None:
            config.setdefault("python", {})["shm-default-byte-size"] = int(shm_default_byte_size)
        if shm_growth_byte_size is not None:
            config.setdefault("python", {})["shm-growth-byte-size"] = int(shm_growth_byte_size)
        self.backend_config = config
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.log_file = Path(log_file) if log_file is not None else None
        self.log_callback = log_callback
        self.cache_dir = cache_dir
        self.exit_timeout_s = exit_timeout_s
        if check_numpy is None:
            check_numpy = os.environ.get("STAC_TRITON_CHECK_NUMPY", "1").strip().lower() not in ("0", "false", "no")
        self.check_numpy = check_numpy
        self.die_with_parent = die_with_parent
        self.startup_timeout = startup_timeout
        self._install = install

        self._proc: Optional[subprocess.Popen] = None
        self._reader: Optional[threading.Thread] = None
        self._tail: collections.deque[str] = collections.deque(maxlen=400)
        self._tail_lock = threading.Lock()
        self._finalizer: Optional[weakref.finalize] = None
        self._services_started: set[str] = set()
        self._started_at: Optional[float] = None
        self.startup_seconds: Optional[float] = None
        self.prepared: Optional[PreparedBackends] = None
        self.command: list[str] = []

    # ---- properties -------------------------------------------------------------------

    @property
    def install(self) -> TritonInstall:
        if self._install is None:
            self._install = find_triton_install()
        return self._install

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> Optional[int]:
        return self._proc.poll() if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _require_ports(self) -> dict[str, int]:
        if not self.ports:
            raise TritonServerError("the server has not been started: ports are not known yet")
        return self.ports

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self._require_ports()['http']}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` as ``tritonclient.grpc.InferenceServerClient(url=...)`` expects."""
        return f"{_url_host(self.host)}:{self._require_ports()['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self._require_ports()['metrics']}/metrics"

    @property
    def urls(self) -> dict[str, str]:
        return {"http": self.http_url, "grpc": self.grpc_url, "metrics": self.metrics_url}

    def log_tail(self, n: int = 40) -> list[str]:
        """The last ``n`` lines the server printed."""
        with self._tail_lock:
            return list(self._tail)[-n:]

    # ---- command line and environment -------------------------------------------------

    def build_command(self, prepared: PreparedBackends) -> list[str]:
        install = self.install
        cmd = [str(install.binary)]
        for repo in self.model_repositories:
            cmd.append(f"--model-repository={repo}")
        cmd += [
            f"--backend-directory={prepared.backend_directory}",
            f"--model-control-mode={self.model_control_mode}",
            f"--http-address={self.host}",
            f"--http-port={self.ports['http']}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports['metrics']}",
            f"--log-verbose={self.log_verbose}",
            "--exit-on-error=true",
            "--strict-readiness=true",
        ]
        if self.exit_timeout_s is not None:
            cmd.append(f"--exit-timeout-secs={int(self.exit_timeout_s)}")
        if install.caches_dir is not None:
            cmd.append(f"--cache-directory={install.caches_dir}")
        for backend, values in self.backend_config.items():
            for key, value in values.items():
                cmd.append(f"--backend-config={backend},{key}={value}")
        cmd += self.extra_args
        return cmd

    def build_env(self, prepared: PreparedBackends) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)

        def prepend(var: str, entries: Sequence[str]) -> None:
            existing = [p for p in env.get(var, "").split(os.pathsep) if p]
            merged = []
            for p in list(entries) + existing:
                if p and p not in merged:
                    merged.append(p)
            env[var] = os.pathsep.join(merged)

        lib_entries = [str(prepared.lib_dir)]
        if prepared.libpython.directory is not None:
            lib_entries.append(str(prepared.libpython.directory))
        if self.install.libs_dir is not None:
            lib_entries.append(str(self.install.libs_dir))
        prepend("LD_LIBRARY_PATH", lib_entries)

        # The stub's isolated interpreter becomes whichever `python3` comes first on PATH.
        prepend("PATH", [str(stub_python_dir())])
        return env

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> "TritonServer":
        """Launch tritonserver (returns at once; see :meth:`wait_ready`)."""
        if self.is_running():
            raise TritonServerError(f"tritonserver is already running (pid {self.pid})")
        self._reap_previous()
        if self.check_numpy:
            check_stub_numpy()
        self.prepared = prepare_backend_directory(self.install, self.cache_dir)

        wanted = self._requested_ports
        taken = [f"{name} port {port}" for name, port in wanted.items() if port and _port_in_use(self.host, port)]
        if taken:
            raise TritonServerError(f"cannot start tritonserver: {', '.join(taken)} already in use on {self.host}")
        free = iter(pick_free_ports(sum(1 for p in wanted.values() if not p), self.host))
        self.ports = {name: (port or next(free)) for name, port in wanted.items()}

        self.command = self.build_command(self.prepared)
        env = self.build_env(self.prepared)
        argv = (_setpriv_pdeathsig() if self.die_with_parent else []) + self.command
        with self._tail_lock:
            self._tail.clear()
            self._services_started = set()
        log.info("starting %s", " ".join(self.command))
        self._started_at = time.monotonic()
        self.startup_seconds = None
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.prepared.root),
                start_new_session=True,  # own process group: stubs included in stop()
                text=True,
                errors="replace",
                bufsize=1,
            )
        except OSError as exc:
            raise TritonServerError(f"could not execute {self.command[0]}: {exc}") from exc
        self._finalizer = weakref.finalize(self, _emergency_stop, self._proc)
        self._reader = threading.Thread(
            target=self._pump_output, args=(self._proc,), name=f"tritonserver-log-{self._proc.pid}", daemon=True
        )
        self._reader.start()
        return self

    def _pump_output(self, proc: subprocess.Popen) -> None:
        sink = None
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            sink = open(self.log_file, "a", encoding="utf-8")
        callback_failed = False
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\r\n")
                started = _SERVICE_STARTED.search(line)
                with self._tail_lock:
                    self._tail.append(line)
                    if started:
                        self._services_started.add(started.group(1))
                if sink is not None:
                    sink.write(line + "\n")
                    sink.flush()
                if self.log_callback is not None and not callback_failed:
                    try:
                        self.log_callback(LOG_PREFIX + line)
                    except Exception:
                        callback_failed = True
                        log.exception("tritonserver log callback failed; no more lines are sent to it")
                elif sink is None and self.log_callback is None:
                    log.debug("%s%s", LOG_PREFIX, line)
        finally:
            if sink is not None:
                sink.close()

    def _drain_output(self, timeout: float = 5.0) -> None:
        if self._reader is not None and self._reader.is_alive():
            self._reader.join(timeout)

    def _expected_services(self) -> Optional[set[str]]:
        """Services whose "Started ... at" log line proves *this* process owns its ports.

        None when the lines cannot be relied on (``--log-info=false`` in extra_args).
        """
        if _is_false(_flag_value(self.extra_args, "--log-info")):
            return None
        expected = {"HTTPService"}
        if not _is_false(_flag_value(self.extra_args, "--allow-grpc")):
            expected.add("GRPCInferenceService")
        if not _is_false(_flag_value(self.extra_args, "--allow-metrics")):
            # Started last: once it is up, the HTTP and gRPC endpoints bound successfully
            # (Triton logs "Started HTTPService" even when the bind then fails).
            expected.add("Metrics Service")
        return expected

    def wait_ready(self, timeout: float = 180.0, poll_interval: float = 0.2) -> float:
        """Wait until the server is ready; return the seconds since :meth:`start`.

        Ready means: the process is alive, its log reported its endpoints started (so a
        foreign server on the same port cannot answer for it), and ``GET /v2/health/ready``
        answers HTTP 200 (with the default strict readiness: every model loaded).

        Raises :class:`TritonServerError` with the last 40 log lines if the server exits
        first or is not ready within ``timeout`` seconds (the server is left running in the
        timeout case; call :meth:`stop`, or use the context manager which always does).
        """
        if self._proc is None:
            raise TritonServerError("wait_ready() before start()")
        url = self.http_url + "/v2/health/ready"
        # Loopback only: never through an http_proxy from the environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        expected = self._expected_services()
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                self._drain_output()
                raise TritonServerError(
                    f"tritonserver exited with code {code} before becoming ready", self.log_tail(40)
                )
            with self._tail_lock:
                missing = (expected - self._services_started) if expected else set()
            try:
                if missing:
                    last_error = f"waiting for {', '.join(sorted(missing))} to start"
                else:
                    with opener.open(url, timeout=2.0) as resp:
                        if resp.status == 200 and self._proc.poll() is None:
                            assert self._started_at is not None
                            self.startup_seconds = time.monotonic() - self._started_at
                            return self.startup_seconds
                        last_error = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                last_error = f"HTTP {exc.code}"
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                last_error = str(getattr(exc, "reason", exc))
            if time.monotonic() >= deadline:
                raise TritonServerError(
                    f"tritonserver (pid {self._proc.pid}) not ready at {url} after {timeout:.0f} s "
                    f"(last answer: {last_error})",
                    self.log_tail(40),
                )
            time.sleep(poll_interval)

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """Stop the server: SIGINT (graceful), then SIGTERM, then SIGKILL to the whole group.

        ``timeout`` bounds the graceful phase; SIGTERM gets up to 10 s more. Stub processes
        left in the process group are killed too. Returns the exit code (None if never
        started). Safe to call repeatedly.
        """
        proc = self._proc
        if proc is None:
            return None
        pgid = proc.pid  # start_new_session=True: the server leads its own group
        if proc.poll() is None:
            for sig, wait_s in ((signal.SIGINT, timeout), (signal.SIGTERM, min(10.0, timeout)), (signal.SIGKILL, 10.0)):
                try:
                    if sig == signal.SIGKILL:
                        _kill_process_group(pgid, sig)
                    else:
                        proc.send_signal(sig)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver (pid %d) still running %.0f s after %s", proc.pid, wait_s, sig.name)
        else:
            proc.wait()
        # Stubs normally exit with their parent; give them a moment, then make sure.
        deadline = time.monotonic() + 5.0
        while _process_group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _kill_process_group(pgid, signal.SIGKILL):
            log.warning("killed processes left in tritonserver's process group %d", pgid)
        self._drain_output()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        return proc.returncode

    def _reap_previous(self) -> None:
        if self._proc is not None:
            self.stop(timeout=5.0)

    def _clash_on_auto_port(self) -> bool:
        """The last start failed because a port *we picked* was taken meanwhile."""
        auto = {self.ports.get(name) for name, port in self._requested_ports.items() if not port}
        for line in self.log_tail(40):
            if not _BIND_FAILURE.search(line):
                continue
            ports = {int(p) for p in re.findall(r":(\d{2,5})\b", line)}
            if ports & auto or (not ports and all(not p for p in self._requested_ports.values())):
                return True
        return False

    def start_and_wait(self, timeout: Optional[float] = None, attempts: int = 3) -> "TritonServer":
        """start() + wait_ready(); retries with fresh ports when an auto-picked one was taken.

        On any failure the server is stopped before the error propagates.
        """
        timeout = self.startup_timeout if timeout is None else timeout
        for attempt in range(1, attempts + 1):
            try:
                self.start()
                self.wait_ready(timeout)
                return self
            except BaseException as exc:
                clash = isinstance(exc, TritonServerError) and self._proc is not None and self._clash_on_auto_port()
                self.stop(timeout=10.0)
                if clash and attempt < attempts:
                    log.warning("tritonserver could not bind its ports (attempt %d); retrying with new ones", attempt)
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def __enter__(self) -> "TritonServer":
        return self.start_and_wait()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running() else "stopped"
        return f"<TritonServer {state} ports={self.ports or self._requested_ports} repos={self.model_repositories}>"


# --------------------------------------------------------------------------------------
# Command line: run a local server in the foreground
# --------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m stac_backend.serving.tritonserver",
        description="Run the tritonserver bundled in nvidia-pytriton on this machine (Ctrl-C stops it).",
    )
    parser.add_argument("--model-repository", action="append", help="model repository (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--model-control-mode", default="none", choices=MODEL_CONTROL_MODES)
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--log-file")
    parser.add_argument("--check", action="store_true", help="only print what would be used and exit")
    parser.add_argument("extra", nargs="*", help="extra tritonserver arguments (after --)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    install = find_triton_install()
    if args.check:
        prepared = prepare_backend_directory(install)
        print(f"tritonserver      {install.binary}")
        print(f"nvidia-pytriton   {install.package_version} (stubs for {', '.join(install.stub_versions())})")
        print(f"backend directory {prepared.backend_directory}")
        print(f"libpython         {prepared.libpython.path} (same build: {prepared.libpython.same_build})")
        print(f"stub python3      {stub_python_dir() / 'python3'} (first on the server's PATH)")
        return 0
    if not args.model_repository:
        parser.error("--model-repository is required")
    server = TritonServer(
        args.model_repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.host,
        model_control_mode=args.model_control_mode,
        log_verbose=args.log_verbose,
        extra_args=args.extra,
        log_file=args.log_file,
        log_callback=print,
        die_with_parent=True,
    )
    with server:
        print(f"ready in {server.startup_seconds:.1f} s: {server.urls}", flush=True)
        try:
            while server.is_running():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return server.returncode or 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
