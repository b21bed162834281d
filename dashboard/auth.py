"""Users and roles of the dashboard.

Two roles:

- ``technician``: may label events (alerts or time spans);
- ``engineer``: may label, and may promote or roll back model versions.

Everyone who can open the dashboard may *view* it (a control-room screen needs no login); every
write needs a signed-in user with the right role, checked on the server before the write
(:func:`can`), not only by hiding buttons.

The users file (``[dashboard] users_file``, TOML, written by ``python -m dashboard.users``)::

    [users.alice]
    role = "technician"
    password_hash = "$argon2id$v=19$m=65536,t=3,p=4$..."

    [users."bob@example.com"]       # OIDC users (st.login): role by name or email, no password
    role = "engineer"
    email = "bob@example.com"

Passwords are hashed with Argon2id (``argon2-cffi``'s :class:`~argon2.PasswordHasher`, its
default parameters, RFC 9106); only the hash is stored. A name that is not in the file is
verified against a dummy hash, so a wrong name costs the same time as a wrong password.
Without a users file (or with one that holds no user), and without OIDC, the dashboard is
read-only and says so.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROLES: tuple[str, ...] = ("engineer", "technician")
ACTIONS: Mapping[str, frozenset[str]] = {
    "label": frozenset({"engineer", "technician"}),
    "manage_models": frozenset({"engineer"}),
}
"""Which roles may do what: ``label`` (submit labels), ``manage_models`` (promote / rollback)."""

USER_NAME_RE = re.compile(r"^[A-Za-z0-9_.@+-]{1,128}$")


class UsersError(Exception):
    """The users file cannot be read or is invalid (the message says which entry and why)."""


@dataclasses.dataclass(frozen=True)
class UserRecord:
    """One entry of the users file."""

    name: str
    role: str
    password_hash: str | None = None
    email: str | None = None


@dataclasses.dataclass(frozen=True)
class User:
    """A signed-in user."""

    name: str
    role: str
    via: str = "password"
    """``"password"`` (users file) or ``"oidc"`` (``st.login``)."""


def can(user: User | None, action: str) -> bool:
    """Whether ``user`` (``None``: nobody signed in) may do ``action`` (a key of :data:`ACTIONS`)."""
    if user is None:
        return False
    return user.role in ACTIONS[action]


def _hasher() -> Any:
    from argon2 import PasswordHasher

    return PasswordHasher()


def hash_password(password: str) -> str:
    """The Argon2id hash of ``password`` (PHC string format).

    Raises:
        ValueError: an empty password.
    """
    if not password:
        raise ValueError("the password must not be empty")
    return _hasher().hash(password)


_DUMMY_HASH: str | None = None


def verify_password(record: UserRecord | None, password: str) -> bool:
    """Whether ``password`` matches the record's hash (``False`` for an unknown user or a user
    without a password, after the same work as a real check)."""
    global _DUMMY_HASH
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

    ph = _hasher()
    if record is None or not record.password_hash:
        if _DUMMY_HASH is None:
            _DUMMY_HASH = ph.hash("pdm-edge-dummy-password")
        try:
            ph.verify(_DUMMY_HASH, password or "-")
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            pass
        return False
    try:
        return bool(ph.verify(record.password_hash, password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def load_users(path: str | os.PathLike[str]) -> dict[str, UserRecord]:
    """Read the users file.

    Raises:
        UsersError: unreadable file, invalid TOML, or an invalid entry (unknown role, bad name,
            a hash that is not a string).
    """
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsersError(f"users file {p} does not exist") from None
    except OSError as exc:
        raise UsersError(f"cannot read users file {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsersError(f"users file {p} is not valid TOML: {exc}") from None
    users = data.get("users", {})
    if not isinstance(users, dict):
        raise UsersError(f"users file {p}: [users] must be a table")
    out: dict[str, UserRecord] = {}
    for name, entry in users.items():
        if not USER_NAME_RE.match(name):
            raise UsersError(f"users file {p}: user name {name!r} must match {USER_NAME_RE.pattern}")
        if not isinstance(entry, dict):
            raise UsersError(f"users file {p}: users.{name} must be a table")
        role = entry.get("role")
        if role not in ROLES:
            raise UsersError(f"users file {p}: users.{name}.role must be one of {', '.join(ROLES)}, got {role!r}")
        pw = entry.get("password_hash")
        if pw is not None and not isinstance(pw, str):
            raise UsersError(f"users file {p}: users.{name}.password_hash must be a string")
        email = entry.get("email")
        if email is not None and not isinstance(email, str):
            raise UsersError(f"users file {p}: users.{name}.email must be a string")
        unknown = set(entry) - {"role", "password_hash", "email"}
        if unknown:
            raise UsersError(f"users file {p}: users.{name} has unknown keys {sorted(unknown)}")
        out[name] = UserRecord(name, role, pw, email)
    return out


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dump_users(users: Mapping[str, UserRecord]) -> str:
    """The users file's text for ``users`` (sorted by name)."""
    lines = ["# pdm-edge dashboard users: written by `python -m dashboard.users`; passwords are Argon2id hashes.", ""]
    for name in sorted(users):
        u = users[name]
        lines.append(f"[users.{_toml_str(name)}]")
        lines.append(f"role = {_toml_str(u.role)}")
        if u.password_hash:
            lines.append(f"password_hash = {_toml_str(u.password_hash)}")
        if u.email:
            lines.append(f"email = {_toml_str(u.email)}")
        lines.append("")
    return "\n".join(lines)


def write_users(path: str | os.PathLike[str], users: Mapping[str, UserRecord]) -> None:
    """Write the users file atomically, readable by its owner only (mode 0600)."""
    from pdm_edge._util.fs import atomic_write

    atomic_write(path, dump_users(users), mode=0o600)


class LoginThrottle:
    """Failed sign-ins counted **per account** (the name typed), shared by every browser session
    of the dashboard process: after ``max_failures`` wrong passwords in a row the account is
    locked for ``lock_s`` seconds, whatever session, tab or reload the next attempt comes from.
    A successful sign-in resets the count. Thread-safe (Streamlit runs sessions on threads).
    In memory: a dashboard restart forgets the counts."""

    def __init__(self, max_failures: int = 5, lock_s: float = 30.0, clock: Any = time.monotonic) -> None:
        self.max_failures = max_failures
        self.lock_s = lock_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, int] = {}
        self._locked_until: dict[str, float] = {}

    def locked_for(self, name: str) -> float:
        """Seconds the account ``name`` stays locked (0: not locked)."""
        with self._lock:
            return max(0.0, self._locked_until.get(name, 0.0) - self._clock())

    def failed(self, name: str) -> bool:
        """Count a wrong password for ``name``; ``True`` when that locks the account."""
        with self._lock:
            n = self._failures.get(name, 0) + 1
            if n >= self.max_failures:
                self._failures.pop(name, None)
                self._locked_until[name] = self._clock() + self.lock_s
                return True
            self._failures[name] = n
            return False

    def succeeded(self, name: str) -> None:
        """A correct password: forget the account's failures."""
        with self._lock:
            self._failures.pop(name, None)
            self._locked_until.pop(name, None)


def oidc_role(users: Mapping[str, UserRecord], name: str | None, email: str | None) -> str | None:
    """The role of an OIDC user: the users-file entry whose name or ``email`` matches (``None``:
    not listed, the user may only view)."""
    for u in users.values():
        if (email and (u.email == email or u.name == email)) or (name and u.name == name):
            return u.role
    return None
