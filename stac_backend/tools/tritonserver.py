"""Run the ``tritonserver`` bundled in ``nvidia-pytriton`` as a child process: start it in its own
process group, forward its log lines, poll ``/v2/health/ready`` and stop it with
SIGINT -> SIGTERM -> SIGKILL. Locating the binary and preparing its backends is
``triton_install.py``'s job.

Example::

    from stac_backend.tools.tritonserver import TritonServer

    with TritonServer("model_repository", log_callback=print) as server:
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
        ...

Run ``python -m stac_backend.tools.tritonserver --help`` for a command-line front end.

This module is over 500 lines because it is one state machine (start, readiness, port clashes,
stop, crash clean-up) around one process; its pieces only make sense together.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

from .triton_install import (
    LOG_PREFIX,
    MODEL_CONTROL_MODES,
    PathLike,
    PreparedBackends,
    TritonInstall,
    TritonServerError,
    check_stub_numpy,
    find_triton_install,
    prepare_backend_directory,
    stub_python_dir,
)

__all__ = ["ADMIN_KEY_HEADER", "RESTRICTED_PROTOCOLS", "TritonServer", "TritonServerError", "pick_free_ports"]

#: Protocol groups a client may use only with the server's admin key: with them a client could write
#: into the host's shared memory, change logging, trace requests or read per-model statistics.
#: Health, metadata, model configuration and inference stay open.
RESTRICTED_PROTOCOLS = ("shared-memory", "model-repository", "logging", "trace", "statistics")
#: The admin key's header (HTTP); gRPC clients send it as ``triton-grpc-protocol-<header>``.
ADMIN_KEY_HEADER = "stac-admin-key"
_SHM = Path("/dev/shm")

log = logging.getLogger(__name__)

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
        restricted_protocols: Triton protocol groups that need the admin key
            (``--grpc-restricted-protocol`` / ``--http-restricted-api``; default
            :data:`RESTRICTED_PROTOCOLS`; empty: none restricted).
        admin_key: the key (default: a fresh random one per server); ``admin_headers(...)``
            gives the headers a client sends with it.

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
        restricted_protocols: Sequence[str] = RESTRICTED_PROTOCOLS,
        admin_key: Optional[str] = None,
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
        # The Python backend's shared-memory regions get a name of this server's own, so that they can
        # be removed from /dev/shm when the server dies without doing so itself.
        self.shm_prefix = f"stac-triton-{os.getpid()}-{secrets.token_hex(4)}-"
        config.setdefault("python", {}).setdefault("shm-region-prefix-name", self.shm_prefix)
        self.shm_prefix = str(config["python"]["shm-region-prefix-name"])
        self.backend_config = config
        self.restricted_protocols = list(restricted_protocols)
        self.admin_key = admin_key or secrets.token_urlsafe(24)
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

    def admin_headers(self, protocol: str = "grpc") -> dict[str, str]:
        """Headers that open the restricted protocol groups (``protocol``: "grpc" or "http")."""
        name = ADMIN_KEY_HEADER if protocol == "http" else f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"
        return {name: self.admin_key}

    def remove_shared_memory(self) -> list[str]:
        """Remove the Python backend's regions of this server left in /dev/shm (after it stopped)."""
        removed = []
        for path in _SHM.glob(self.shm_prefix + "*") if _SHM.is_dir() else []:
            try:
                path.unlink()
                removed.append(path.name)
            except OSError:
                pass
        return removed

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
        if self.restricted_protocols:
            groups = ",".join(self.restricted_protocols)
            cmd.append(f"--grpc-restricted-protocol={groups}:{ADMIN_KEY_HEADER}={self.admin_key}")
            cmd.append(f"--http-restricted-api={groups}:{ADMIN_KEY_HEADER}={self.admin_key}")
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
        removed = self.remove_shared_memory()
        if removed:
            log.warning("removed shared memory left by tritonserver: %s", ", ".join(removed))
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
        prog="python -m stac_backend.tools.tritonserver",
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
