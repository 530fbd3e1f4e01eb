"""Shared by the entry points: where the config tree is, the W&B mode, the sweep directory,
the one-line usage error. (The run directory itself: ``genlab.runs``.)"""

from __future__ import annotations

import logging
import netrc
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit


def _conf_dir() -> Path:
    """The Hydra config tree: $GENLAB_CONF_DIR if set, else the genlab/conf/ an installed wheel
    ships (setup.py copies it there at build time), else the checkout's top-level conf/ (a
    source tree or an editable install, which reads conf/ live)."""
    if os.environ.get("GENLAB_CONF_DIR"):
        return Path(os.environ["GENLAB_CONF_DIR"]).expanduser().resolve()
    package = Path(__file__).resolve().parent
    if (package / "conf" / "config.yaml").is_file():
        return package / "conf"
    return package.parents[1] / "conf"


CONF_DIR = _conf_dir()


def wandb_mode(requested: str | None, check_network: bool = True) -> str:
    """``auto`` -> ``online`` when the user is logged in to W&B (WANDB_API_KEY or ~/.netrc),
    else ``offline``; any other value is passed through, except that ``online`` becomes
    ``offline`` with one warning when the W&B server cannot be reached (``check_network``):
    wandb would otherwise retry for minutes before the run starts."""
    mode = _wandb_mode(requested)
    if mode == "online" and check_network:
        reason = wandb_unreachable()
        if reason is not None:
            logging.getLogger("genlab").warning(
                "W&B is set online but %s: logging offline instead (sync later with "
                "`wandb sync <run>/wandb/offline-run-*`)",
                reason,
            )
            return "offline"
    return mode


def _wandb_mode(requested: str | None) -> str:
    if requested not in (None, "auto"):
        return str(requested)
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds (always True when
    an HTTPS proxy is set: the proxy, not this machine, resolves the host)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def wandb_unreachable(timeout: float = 3.0) -> str | None:
    """Why the W&B server (``WANDB_BASE_URL``, default https://api.wandb.ai) cannot be
    reached (``reachable``); None when it can."""
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host = url.hostname or "api.wandb.ai"
    port = url.port or (80 if url.scheme == "http" else 443)
    if reachable(host, port, timeout):
        return None
    return f"{host}:{port} cannot be reached within {timeout:g} s"


def sweep_dir() -> Path | None:
    """The sweep directory when running as a job of a Hydra multirun (-m), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ValueError, ImportError):
        return None
    return Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


class UsageError(SystemExit):
    """A command was given something it cannot use: one line saying what and what to do
    (exits with status 1 and the message, no traceback)."""


class UserError(Exception):
    """Raised for what the user gave (a config value, a path, a file), not for a defect: the
    message says what was wrong and what to do. The commands print it as one line, with the
    traceback only under ``HYDRA_FULL_ERROR=1`` (:func:`reported`). The errors that subclass
    it keep their builtin base too (``DatasetNotFoundError`` is a ``FileNotFoundError``)."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (``data.batch_size=0``, ``model.num_classes=5`` on
    ten-class data, ``trainer.max_steps=abc``)."""


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception as one short line: its type and message, lines joined, bold codes removed."""
    text = " ".join(str(err).replace("\x1b[1m", "").replace("\x1b[0m", "").split())
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def user_error(err: BaseException) -> UserError | None:
    """The ``UserError`` behind ``err``: itself, or the cause Hydra's ``instantiate`` wrapped
    (a datamodule's constructor rejecting ``data.batch_size=0``), else None."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, UserError):
            return err
        err, seen = err.__cause__, seen + 1
    return None


@contextmanager
def reported():
    """Around a command's body: a ``UserError`` (or one that ``instantiate`` wrapped) leaves as
    ``UsageError`` "error: <message>" on one line, exit status 1; anything else, and everything
    under ``HYDRA_FULL_ERROR=1``, keeps its traceback."""
    try:
        yield
    except Exception as err:
        found = user_error(err)
        if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        text = " ".join(str(found).split())
        raise UsageError(f"error: {text}") from None


def compose(config_name: str, overrides: list[str]):
    """The config ``python -m genlab.<command> <overrides>`` would run (Hydra's compose API,
    for calling a command from Python); a bad override raises ``UsageError`` with Hydra's
    one-line message."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise UsageError(f"error: {' '.join(str(err).split())}") from None
    finally:
        GlobalHydra.instance().clear()


def group_overrides(args: list[str]) -> list[str]:
    """Command-line overrides with a nested config group written as a key (``model.net=dit``,
    ``model.net=unet,dit`` in a sweep) rewritten to Hydra's group syntax (``model/net=dit``),
    so that the option's whole YAML replaces the node instead of the string ``dit`` replacing
    it. Only keys that name a folder of ``conf/`` are rewritten; everything else is kept."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        plus = len(key) - len(key.lstrip("+~"))
        path = key[plus:]
        if sep and "." in path and (CONF_DIR / path.replace(".", "/")).is_dir():
            arg = f"{key[:plus]}{path.replace('.', '/')}={value}"
        out.append(arg)
    return out
