"""A throwaway PostgreSQL server for the tests: initdb in a temporary folder, a Unix socket there, no TCP.

``PostgresServer.start()`` finds the server binaries (``/usr/lib/postgresql/*/bin``, as Debian's
``postgresql`` package installs them, or ``initdb`` on PATH), and runs them as an unprivileged user when the
tests run as root (PostgreSQL refuses root): ``nobody``. The cluster is tuned for tests only (fsync,
synchronous_commit and full_page_writes off). ``create_schema()`` gives a test a schema of its own in one
shared database (instant); ``create_database()`` a database of its own (a file copy: slower on a busy machine).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

UNPRIVILEGED_USER = "nobody"
SUPERUSER = "rag"  # the cluster's superuser, reached over the socket without a password (trust)


def find_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None when the server is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


class PostgresServer:
    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.base = Path(tempfile.mkdtemp(prefix="rag-pg-"))  # short: a socket path is at most 107 bytes
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self._as: dict = {}
        self.shared_db = "rag_tests"
        if os.geteuid() == 0:
            user = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(self.base, user.pw_uid, user.pw_gid)
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def _run(self, *args: str) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.base)}
        proc = subprocess.run([str(self.bin_dir / args[0]), *args[1:]], cwd=self.base, env=env,
                              capture_output=True, text=True, timeout=120, **self._as)
        if proc.returncode:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stdout}{proc.stderr}{log}")

    def start(self) -> PostgresServer:
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                  "--locale=C", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# tests only: nothing here must survive a crash\n"
                f"listen_addresses = ''\nunix_socket_directories = '{self.base}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "shared_buffers = 32MB\nmax_connections = 200\n"
            )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {self.shared_db}")
        return self

    def url(self, dbname: str = "postgres", schema: str | None = None) -> str:
        options = f"&options=-csearch_path%3D{schema}" if schema else ""
        return f"postgresql://{SUPERUSER}@/{dbname}?host={self.base}{options}"

    def create_database(self) -> str:
        """A new empty database; returns its URL (about 50 ms on an idle machine, more on a busy one)."""
        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY FILE_COPY")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = conninfo_to_dict(url)["dbname"]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def create_schema(self) -> str:
        """A new empty schema in the shared test database, the only one on the URL's search_path: the registry's
        tables land there, so each test sees only its own (advisory locks and NOTIFY channels are per database,
        so tests in one database can only wake or briefly wait for each other, never see each other's rows)."""
        name = "s_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url(self.shared_db), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        return self.url(self.shared_db, name)

    def drop_schema(self, url: str) -> None:
        options = conninfo_to_dict(url)["options"]
        name = options.split("=", 1)[1]
        with psycopg.connect(self.url(self.shared_db), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
