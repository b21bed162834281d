"""Streamlit glue shared by the pages: configuration, the signed-in user, cached resources and
cached queries.

Decisions:

- **Configuration**: :func:`pdm_edge.config.load_config` with the path from
  ``streamlit run dashboard/app.py -- --config PATH``, else ``$PDM_EDGE_CONFIG`` (else the
  environment overrides alone). Read on every script run (a few ms), so an edited file applies
  at the next refresh.
- **Resources** (``st.cache_resource``, one per process, shared by every browser session): the
  store client (:func:`pdm_edge.store.factory.open_store`), the label book and the registry.
  All three are thread-safe. A registry that does not exist yet is not cached (so it is found
  once the appliance creates it).
- **Queries** (``st.cache_data``): keyed by the configuration and a *tick*, ``floor(now /
  refresh_s)``: every session in the same refresh period shares one answer (ten control-room
  screens cost one query), and the next period asks again. Entries expire after 2 minutes.
  The label book is read uncached: a label must show the moment it is given.
- **Users**: see :mod:`dashboard.auth`. The signed-in user lives in the browser session
  (``st.session_state``); a page reload signs out. OIDC (``st.login``) is used only when
  ``.streamlit/secrets.toml`` has an ``[auth]`` section.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import streamlit as st

from dashboard import data
from dashboard.auth import LoginThrottle, User, UserRecord, UsersError, can, load_users, oidc_role, verify_password
from pdm_edge.config import AppConfig, load_config
from pdm_edge.errors import ConfigError, StoreError

def _prewarm() -> None:
    """Import the registry (and with it torch, ~2 s) in the background when the server process
    starts, so that the first page view does not wait for it."""
    import importlib
    import threading

    def run() -> None:
        try:
            importlib.import_module("pdm_edge.registry")
        except Exception:  # the page reports a broken install when it needs the registry
            pass

    threading.Thread(target=run, name="pdm-edge-prewarm", daemon=True).start()


_prewarm()  # once per process: this module is imported once

CTX_KEY = "_pdm_ctx"
USER_KEY = "pdm_user"
MACHINE_KEY = "pdm_machine"
FLASH_KEY = "pdm_flash"
QUERY_TTL_S = 120
LOGIN_MAX_FAILURES = 5
LOGIN_LOCK_S = 30.0


def config_path_from_argv(argv: Sequence[str]) -> str | None:
    """``--config PATH`` from the script's arguments (``streamlit run app.py -- --config PATH``)."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--config")
    ns, _ = ap.parse_known_args(list(argv))
    return ns.config


@dataclasses.dataclass
class Ctx:
    """What every page needs: the configuration, the users and who is signed in."""

    cfg: AppConfig
    cfg_key: str
    config_path: str | None
    users: dict[str, UserRecord]
    users_error: str | None
    oidc: bool
    user: User | None

    @property
    def read_only(self) -> bool:
        """No way to sign in: no users file (or an empty or broken one) and no OIDC."""
        return not self.users and not self.oidc

    def can(self, action: str) -> bool:
        return can(self.user, action)


def _oidc_configured() -> bool:
    try:
        return "auth" in st.secrets
    except Exception:  # no secrets file: st.secrets raises on access
        return False


def load_ctx() -> Ctx:
    """Read the configuration and users and work out who is signed in (``st.stop()`` with the
    reason on a configuration error)."""
    path = config_path_from_argv(sys.argv[1:]) or os.environ.get("PDM_EDGE_CONFIG") or None
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        st.error(f"**pdm-edge configuration error** — {exc}\n\nConfiguration file: `{path or '(none: environment only)'}`. "
                 "Fix it and reload the page.")
        st.stop()
    users: dict[str, UserRecord] = {}
    users_error = None
    if cfg.dashboard.users_file:
        try:
            users = load_users(cfg.dashboard.users_file)
        except UsersError as exc:
            users_error = str(exc)
    oidc = _oidc_configured()
    user = None
    if oidc:
        try:
            if st.user.is_logged_in:
                name = str(st.user.get("name") or st.user.get("email") or "oidc-user")
                role = oidc_role(users, st.user.get("name"), st.user.get("email"))
                user = User(name, role, "oidc") if role else None
        except Exception:
            user = None
    else:
        u = st.session_state.get(USER_KEY)
        if isinstance(u, dict) and u.get("name") in users and users[u["name"]].role == u.get("role"):
            user = User(u["name"], u["role"], "password")  # still in the file with the same role
        elif u is not None:
            st.session_state.pop(USER_KEY, None)
    c = Ctx(cfg, cfg.model_dump_json(), path, users, users_error, oidc, user)
    st.session_state[CTX_KEY] = c
    return c


def _leave_legacy_pages_mode() -> None:
    """Streamlit treats a ``pages/`` folder beside the main script as a legacy (v1) multipage
    app until the first ``st.navigation`` call in the process; so the very first request of a
    fresh server for a page URL (``/machine``) runs the page file alone, without ``app.py``.
    Switch that mode off and rerun: the rerun goes through ``app.py`` and its navigation, to
    the same page (same URL path)."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a Streamlit without the legacy mode
        return
    if getattr(PagesManager, "uses_pages_directory", False):
        PagesManager.uses_pages_directory = False
        from streamlit import config as st_config

        if not st_config.get_option("global.appTest"):  # AppTest resets the mode before every run: render on
            st.rerun()


def page_start() -> Ctx:
    """Start a page: sign-in in the sidebar, the access banner and the confirmation of the last
    write (:func:`flash`); returns the context. (Done by each page rather than by ``app.py``:
    after its first run, Streamlit's ``AppTest`` runs only the page script of a multipage app,
    and the pages are tested with it.)"""
    _leave_legacy_pages_mode()
    style()
    c = load_ctx()
    sidebar_login(c)
    banner(c)
    show_flash()
    return c


def ctx() -> Ctx:
    """The context of this script run (made by ``app.py``; made here when a page runs alone)."""
    c = st.session_state.get(CTX_KEY)
    return c if isinstance(c, Ctx) else load_ctx()


def tick(c: Ctx) -> int:
    """The current refresh period: ``floor(now / refresh_s)``."""
    return int(time.time() // c.cfg.dashboard.refresh_s)


# -- resources ---------------------------------------------------------------------------------
@st.cache_resource(show_spinner=False)
def login_throttle() -> LoginThrottle:
    """The process-wide failed-sign-in counts (per account, across browser sessions)."""
    return LoginThrottle(LOGIN_MAX_FAILURES, LOGIN_LOCK_S)


@st.cache_resource(show_spinner=False)
def _store(store_key: str, _cfg: Any) -> Any:
    from pdm_edge.store.factory import open_store

    return open_store(_cfg)


def get_store(c: Ctx) -> tuple[Any, str | None]:
    """``(store, None)`` or ``(None, why it could not be opened)``."""
    try:
        return _store(c.cfg.store.model_dump_json(), c.cfg.store), None
    except StoreError as exc:
        return None, str(exc)


@st.cache_resource(show_spinner=False)
def _book(state_dir: str) -> Any:
    from pdm_edge.feedback import LabelBook

    return LabelBook.in_dir(state_dir)


def get_book(c: Ctx) -> tuple[Any, str | None]:
    """``(label book, None)`` or ``(None, why)``."""
    try:
        return _book(os.path.abspath(c.cfg.feedback.state_dir)), None
    except StoreError as exc:
        return None, str(exc)


@st.cache_resource(show_spinner=False)
def _registry(root: str) -> Any:
    reg = data.open_registry(root)
    if reg is None:
        raise FileNotFoundError(root)  # not cached: looked for again next time
    return reg


def get_registry(c: Ctx) -> tuple[Any, str | None]:
    """``(registry, None)``, ``(None, None)`` when none exists yet, or ``(None, why)``."""
    try:
        return _registry(os.path.abspath(c.cfg.registry.dir)), None
    except FileNotFoundError:
        return None, None
    except Exception as exc:  # RegistryError, sqlite errors
        return None, str(exc)


# -- cached queries ----------------------------------------------------------------------------
@st.cache_data(ttl=QUERY_TTL_S, max_entries=32, show_spinner=False)
def q_registry_versions(cfg_key: str, tick_: int, _c: Ctx) -> list[dict[str, Any]]:
    reg, _ = get_registry(_c)
    return data.registry_versions(reg)


@st.cache_data(ttl=QUERY_TTL_S, max_entries=32, show_spinner=False)
def q_fleet(cfg_key: str, tick_: int, _c: Ctx) -> list[data.FleetRow]:
    store, err = get_store(_c)
    if store is None:
        raise StoreError(err or "store unavailable")
    return data.fleet_status(store, _c.cfg, time.time_ns(), q_registry_versions(cfg_key, tick_, _c))


@st.cache_data(ttl=QUERY_TTL_S, max_entries=64, show_spinner=False)
def q_buckets(cfg_key: str, site: str, machine: str, sensor: str, start_ns: int, end_ns: int, max_points: int,
              tick_: int, _c: Ctx) -> tuple[list[Any], float]:
    store, err = get_store(_c)
    if store is None:
        raise StoreError(err or "store unavailable")
    return data.score_buckets(store, site, machine, sensor, start_ns, end_ns, max_points)


@st.cache_data(ttl=QUERY_TTL_S, max_entries=64, show_spinner=False)
def q_condition_buckets(cfg_key: str, site: str, machine: str, sensor: str, start_ns: int, end_ns: int, every_s: float,
                        tick_: int, _c: Ctx) -> list[Any]:
    store, err = get_store(_c)
    if store is None:
        raise StoreError(err or "store unavailable")
    return store.query_condition_buckets(site, machine, sensor, start_ns, end_ns, every_s)


@st.cache_data(ttl=QUERY_TTL_S, max_entries=64, show_spinner=False)
def q_alerts(cfg_key: str, site: str, machine: str, start_ns: int, end_ns: int, tick_: int, _c: Ctx) -> list[Any]:
    store, err = get_store(_c)
    if store is None:
        raise StoreError(err or "store unavailable")
    return store.query_alerts(site, machine, start_ns, end_ns)


@st.cache_data(ttl=QUERY_TTL_S, max_entries=64, show_spinner=False)
def q_model_events(cfg_key: str, site: str, machine: str, start_ns: int, end_ns: int, tick_: int, _c: Ctx) -> list[Any]:
    store, err = get_store(_c)
    if store is None:
        raise StoreError(err or "store unavailable")
    return store.query_model_events(site, machine, start_ns, end_ns)


def clear_query_caches() -> None:
    """Forget cached query answers (after a write)."""
    for fn in (q_registry_versions, q_fleet, q_buckets, q_condition_buckets, q_alerts, q_model_events):
        fn.clear()


# -- page furniture ----------------------------------------------------------------------------
def style() -> None:
    """Tighter page margins (more rows on a control-room screen) and a larger status column."""
    st.markdown(
        """<style>
        .block-container {padding-top: 2.6rem; padding-bottom: 1rem; max-width: 100%;}
        div[data-testid="stMetric"] {background: rgba(128,128,128,0.06); border-radius: 0.5rem; padding: 0.35rem 0.8rem;}
        div[data-testid="stMetricValue"] {font-size: 1.9rem;}
        div[data-testid="stAppDeployButton"] {display: none;}
        </style>""",
        unsafe_allow_html=True,
    )


def banner(c: Ctx) -> None:
    """The access banner on every page: read-only (no users), or a broken users file."""
    if c.users_error:
        st.error(f"Read-only: the users file cannot be used — {c.users_error}", icon=":material/lock:")
    elif c.read_only:
        st.warning("**Read-only dashboard** — no user accounts are configured (`[dashboard] users_file`), so labelling "
                   "and model changes are disabled. Add users with `python -m dashboard.users add NAME --role technician`.",
                   icon=":material/lock:")


def sidebar_login(c: Ctx) -> None:
    """Sign-in / sign-out in the sidebar."""
    with st.sidebar:
        st.markdown("### Access")
        if c.oidc:
            if c.user is not None:
                st.write(f"Signed in as **{md(c.user.name)}** ({c.user.role})")
                if st.button("Sign out"):
                    st.logout()
            else:
                try:
                    logged_in = bool(st.user.is_logged_in)
                except Exception:
                    logged_in = False
                if logged_in:
                    st.info("Signed in, but your account has no role in the users file: view only.")
                    if st.button("Sign out"):
                        st.logout()
                elif st.button("Sign in", type="primary"):
                    st.login()
            return
        if c.read_only:
            st.caption("No users configured: view only.")
            return
        if c.user is not None:
            st.write(f"Signed in as **{md(c.user.name)}** · {c.user.role}")
            if st.button("Sign out", key="signout"):
                for k in [k for k in st.session_state if k == USER_KEY or str(k).startswith("pdm_pending")]:
                    del st.session_state[k]  # pending (unconfirmed) actions go with the user
                st.rerun()
            return
        with st.form("login", clear_on_submit=False):
            name = st.text_input("User", key="login_user")
            pw = st.text_input("Password", type="password", key="login_password")
            submitted = st.form_submit_button("Sign in", type="primary")
        if submitted:
            throttle, who = login_throttle(), name.strip()
            wait = throttle.locked_for(who)
            if wait > 0:
                st.error(f"Too many failed attempts for this account; try again in {wait:.0f} s.")
            elif verify_password(c.users.get(who), pw):
                rec = c.users[who]
                throttle.succeeded(who)
                st.session_state[USER_KEY] = {"name": rec.name, "role": rec.role}
                st.rerun()
            else:
                throttle.failed(who)
                st.error("Unknown user or wrong password.")
        st.caption("Sign in to label events (technician) or manage models (engineer). Viewing needs no sign-in.")


def flash(message: str, kind: str = "success") -> None:
    """A message shown once, after the next rerun (confirmation of a write); ``kind`` is
    ``success``, ``info`` or ``error``."""
    st.session_state[FLASH_KEY] = (kind, message)


def show_flash() -> None:
    item = st.session_state.pop(FLASH_KEY, None)
    if item:
        kind, message = item
        icons = {"success": ":material/check_circle:", "info": ":material/info:", "error": ":material/error:"}
        getattr(st, kind)(message, icon=icons.get(kind))


_WJ = "\u2060"
_MD_SPECIAL = set("\\`*_{}[]<>()#+-.!|~$=\"'&")


def md(text: str | None) -> str:
    """Free text (a note, an author, a reason, an id) made literal for ``st.markdown``: every ASCII
    punctuation character that Markdown or Streamlit's extensions (``:red[...]``,
    ``$...$``) could read is backslash-escaped, and ``:`` is written as the character reference
    ``&#58;`` (so that ``:material/...:`` is not recognised); a WORD JOINER (U+2060, invisible)
    goes before ``://``, after ``www`` and after ``@``, because GFM turns a bare URL or e-mail address
    in the *rendered* text into a link whatever its escaping; newlines become line breaks."""
    if not text:
        return ""
    text = str(text).replace("://", _WJ + "://").replace("www.", "www" + _WJ + ".").replace("@", "@" + _WJ)
    out = "".join("\\" + ch if ch in _MD_SPECIAL else "&#58;" if ch == ":" else ch for ch in text)
    return out.replace("\r\n", "\n").replace("\n", "  \n")


def status_badge(status: str) -> str:
    """The status as Markdown with its coloured icon."""
    return f"{data.STATUS_ICONS.get(status, '')} {status}"
