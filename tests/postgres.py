"""A throwaway PostgreSQL server for the tests and the shared-grid benchmark: Debian's postgresql
package, `initdb` in a temporary folder, listening on a loopback port, stopped at the end."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import free_port


def server_bin() -> Path | None:
    """The folder of initdb and pg_ctl (None without the server package or psycopg)."""
    try:
        import psycopg  # noqa: F401  (SQLAlchemy's PostgreSQL driver)
    except ImportError:
        return None
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextmanager
def postgres() -> Iterator[str]:
    """A running server; yields the URL of its 'postgres' database for the user 'defungi'."""
    bin_dir = server_bin()
    assert bin_dir is not None, "no PostgreSQL server"
    root = Path(tempfile.mkdtemp(prefix="defungi-pg-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the package's 'postgres' user runs the server
        shutil.chown(root, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    try:
        subprocess.run(
            [*as_owner, str(bin_dir / "initdb"), "-D", str(data), "-U", "defungi", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        options = f"-p {port} -h 127.0.0.1 -k {root} -c max_connections=200 -c fsync=off"
        subprocess.run(
            [
                *as_owner,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "log"),
                "-w",
                "-o",
                options,
                "start",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://defungi@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_owner, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def new_database(server_url: str, name: str) -> str:
    """CREATE DATABASE name on the server; its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"
