"""Manage the dashboard's users file: ``python -m dashboard.users add|remove|list``.

::

    python -m dashboard.users add alice --role technician          # asks for the password twice
    echo 's3cret' | python -m dashboard.users add bob --role engineer --password-stdin
    python -m dashboard.users list
    python -m dashboard.users remove alice

The file is ``--file PATH``, else ``[dashboard] users_file`` of the configuration (``--config``
or ``$PDM_EDGE_CONFIG``). Passwords are stored as Argon2id hashes (:mod:`dashboard.auth`); the
file is rewritten atomically with mode 0600 (comments in it are not kept).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from dashboard.auth import ROLES, USER_NAME_RE, UserRecord, UsersError, hash_password, load_users, write_users


def _users_path(args: argparse.Namespace) -> Path:
    if args.file:
        return Path(args.file)
    from pdm_edge.config import load_config
    from pdm_edge.errors import ConfigError

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc} (or give the users file with --file)") from None
    if not cfg.dashboard.users_file:
        raise SystemExit("error: no users file: set [dashboard] users_file in the configuration or give --file PATH")
    return Path(cfg.dashboard.users_file)


def _read_password(from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        pw = sys.stdin.readline().rstrip("\r\n")
    else:
        pw = getpass.getpass("password: ")
        if getpass.getpass("repeat password: ") != pw:
            raise SystemExit("error: the passwords differ")
    if len(pw) < 8:
        raise SystemExit("error: the password must have at least 8 characters")
    return pw


def _load(path: Path) -> dict[str, UserRecord]:
    if not path.exists():
        return {}
    try:
        return load_users(path)
    except UsersError as exc:
        raise SystemExit(f"error: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dashboard.users", description="Manage the pdm-edge dashboard's users file.")
    ap.add_argument("--file", help="the users file (default: [dashboard] users_file of the configuration)")
    ap.add_argument("--config", help="configuration file (default: $PDM_EDGE_CONFIG)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="add a user (or, with --replace, change a user's role and password)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--email", help="e-mail address, to give an OIDC (st.login) user this role")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    add.add_argument("--no-password", action="store_true", help="no password (an OIDC-only user)")
    add.add_argument("--replace", action="store_true", help="replace an existing user")
    rm = sub.add_parser("remove", help="remove a user")
    rm.add_argument("name")
    sub.add_parser("list", help="list users and roles (never the hashes)")
    args = ap.parse_args(argv)

    path = _users_path(args)
    users = _load(path)
    if args.cmd == "list":
        for u in sorted(users.values(), key=lambda u: u.name):
            print(f"{u.name}\t{u.role}\t{'password' if u.password_hash else 'no password'}{chr(9) + u.email if u.email else ''}")
        return 0
    if not USER_NAME_RE.match(args.name):
        raise SystemExit(f"error: user name must match {USER_NAME_RE.pattern}")
    if args.cmd == "remove":
        if args.name not in users:
            raise SystemExit(f"error: no user {args.name!r} in {path}")
        del users[args.name]
        write_users(path, users)
        print(f"removed {args.name} from {path}")
        return 0
    if args.name in users and not args.replace:
        raise SystemExit(f"error: user {args.name!r} exists in {path}; use --replace to change it")
    pw_hash = None if args.no_password else hash_password(_read_password(args.password_stdin))
    users[args.name] = UserRecord(args.name, args.role, pw_hash, args.email)
    write_users(path, users)
    print(f"{'updated' if args.replace else 'added'} {args.name} ({args.role}) in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
