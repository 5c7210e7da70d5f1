"""Run a real Triton Inference Server on this machine: the ``tritonserver`` binary of NVIDIA's
``nvidia-pytriton`` wheel (Triton 2.x with the python backend; it runs without a GPU).

The python backend's stub embeds the Python found first on ``PATH`` and imports numpy into it; the
stub is built against numpy 1.x, so Triton gets its own virtual environment (``numpy<2``,
onnxruntime, OpenCV for the ``telea`` masked source, the wheel) apart from the gateway's, as in
production where Triton runs in its own container. :func:`setup_env` makes it; :class:`TritonServer`
starts the binary from it, bound to 127.0.0.1, and waits for ``/v2/health/ready``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cleanplate.errors import TritonUnavailable

# What the Triton side needs; numpy<2 for the python-backend stub (see the module docstring).
# OpenCV runs the telea masked source inside cleanplate_remove; 4.12 and later require numpy>=2.
TRITON_ENV_PACKAGES = ("nvidia-pytriton==0.7.0", "numpy<2", "onnxruntime>=1.19,<2",
                       "opencv-python-headless>=4.10,<4.12")
ENV_MARKER = "cleanplate-triton-env.txt"


def default_env_path() -> Path:
    """``$CLEANPLATE_TRITON_ENV``, else ``triton-env/`` inside the current virtual environment (sys.prefix)."""
    return Path(os.environ.get("CLEANPLATE_TRITON_ENV") or Path(sys.prefix) / "triton-env")


def setup_env(path: str | Path | None = None, *, python: str | None = None,
              progress: Callable[[str], None] | None = None) -> Path:
    """Create (or update) the Triton virtual environment at ``path`` with :data:`TRITON_ENV_PACKAGES`.

    Idempotent: a marker file records the package list, and a second call with the same list does
    nothing; concurrent calls for one path wait on a file lock beside it. Needs the package registry (PyPI);
    about 580 MB. Raises TritonUnavailable when venv or pip fails (the message ends with pip's last lines).
    """
    from filelock import FileLock

    say = progress or (lambda msg: None)
    env = Path(path) if path is not None else default_env_path()
    env.parent.mkdir(parents=True, exist_ok=True)
    # Two setups at once (two CLI calls, parallel test workers) would pip-install into one venv: the second
    # waits here, then finds the marker.
    with FileLock(str(env.parent / f".{env.name}.lock")):
        return _setup_env_locked(env, python, say)


def _setup_env_locked(env: Path, python: str | None, say: Callable[[str], None]) -> Path:
    marker = env / ENV_MARKER
    wanted = "\n".join(TRITON_ENV_PACKAGES)
    if marker.exists() and marker.read_text() == wanted and _server_root(env, check=False) is not None:
        say(f"Triton environment is ready: {env}")
        return env
    steps = [[python or sys.executable, "-m", "venv", str(env)],
             [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              *TRITON_ENV_PACKAGES]]
    for cmd in steps:
        say(" ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
            raise TritonUnavailable(f"{' '.join(cmd[:4])} ... failed:\n{tail}")
    marker.write_text(wanted)
    say(f"Triton environment is ready: {env}")
    return env


def _site_packages(env: Path) -> Path | None:
    found = sorted(env.glob("lib/python3*/site-packages"))
    return found[0] if found else None


def _server_root(env: Path, *, check: bool = True) -> Path | None:
    site = _site_packages(env)
    root = site / "pytriton" / "tritonserver" if site else None
    if root is None or not (root / "bin" / "tritonserver").exists():
        if check:
            raise TritonUnavailable(f"no Triton environment at {env}; run `cleanplate triton setup`")
        return None
    return root


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies (Linux prctl
    PR_SET_PDEATHSIG), so a crashed test run or CLI leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """One ``tritonserver`` process serving ``repository`` on 127.0.0.1.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Ports default to free ones. On
    SIGTERM Triton finishes in-flight requests and waits up to ``exit_timeout_s`` for clients to
    disconnect before it exits.

    Attributes:
        http_url, grpc_url, metrics_url: ``host:port`` of each endpoint once started.
        log_path: the server's stdout and stderr.
    """

    def __init__(self, repository: str | Path, *, env: str | Path | None = None, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, host: str = "127.0.0.1",
                 log_path: str | Path | None = None, exit_timeout_s: int = 30,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.repository = Path(repository).resolve()
        self.env = Path(env) if env is not None else default_env_path()
        self.host = host
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.exit_timeout_s = exit_timeout_s
        self.extra_args = extra_args
        self._work = Path(tempfile.mkdtemp(prefix="cleanplate-triton-"))
        self._shm_prefix = f"cleanplate_{self._work.name.rsplit('-', 1)[-1]}_"  # unique per server
        self.log_path = Path(log_path) if log_path else self._work / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    http_url = property(lambda self: f"{self.host}:{self.http_port}")
    grpc_url = property(lambda self: f"{self.host}:{self.grpc_port}")
    metrics_url = property(lambda self: f"{self.host}:{self.metrics_port}")

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The command line and environment that start the server (prepares the backend directory)."""
        root = _server_root(self.env)
        env_python = self.env / "bin" / "python"
        version = subprocess.run([str(env_python), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise TritonUnavailable(f"the Triton wheel has no python-backend stub for Python {version}")
        backends = self._work / "backends"
        if not backends.exists():  # the stub must sit in the python backend's directory
            shutil.copytree(root / "backends", backends)
            shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
        libs = _site_packages(self.env) / "nvidia_pytriton.libs"
        env = dict(os.environ)
        env["PATH"] = f"{self.env / 'bin'}:{env.get('PATH', '')}"  # the stub's Python is the env's
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(libs), env.get("LD_LIBRARY_PATH")) if p)
        env.pop("PYTHONPATH", None)
        cmd = [str(root / "bin" / "tritonserver"), f"--model-repository={self.repository}",
               f"--backend-directory={backends}", f"--cache-directory={root / 'caches'}",
               f"--http-address={self.host}", f"--grpc-address={self.host}", f"--metrics-address={self.host}",
               f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}",
               "--allow-gpu-metrics=false", "--strict-readiness=true", "--exit-on-error=true", "--log-info=true",
               f"--exit-timeout-secs={self.exit_timeout_s}",
               # The python backend names its shared-memory regions by this prefix; two servers on one
               # machine (test workers, a restart while the old stubs still exit) must not share it, or
               # one aborts with boost::interprocess::lock_exception (python_backend README, "Running
               # Multiple Instances of Triton Server").
               f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
               *self.extra_args]
        return cmd, env

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        """Start and wait until ``/v2/health/ready`` answers 200 (all models loaded).

        Raises TritonUnavailable (with the end of the server log) when it exits or is not ready in time.
        """
        cmd, env = self.command()
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonUnavailable(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.is_ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise TritonUnavailable(f"tritonserver was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM (Triton drains), then SIGKILL after ``timeout_s`` (default exit_timeout_s + 10). Returns the
        exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(self.exit_timeout_s + 10 if timeout_s is None else timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self._work / "backends", ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
