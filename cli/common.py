"""Pieces shared by the click front-ends: error translation and shared options."""
from __future__ import annotations

import functools
import shlex
import sys
from typing import Any, Callable

import click


def domain_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's own errors into one clear line and exit status 1, never a traceback.

    Library errors are the exception types the packages define (store, annotations, query,
    checkpoints, frames, heads); each already says what went wrong and where. ``OSError`` (a
    missing file, no permission, a full or read-only disk) is one too, from wherever it comes.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except click.ClickException:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # noqa: BLE001 - filtered just below
            if _is_domain_error(err):
                message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
                raise click.ClickException(str(message)) from err
            raise

    return wrapper


_OUR_PACKAGES = ("featstore", "heads", "cli")


def _raised_by_us(err: BaseException) -> bool:
    """True when the innermost frame that raised ``err`` is in our packages (a deliberate check)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return module.split(".")[0] in _OUR_PACKAGES


def _is_domain_error(err: BaseException) -> bool:
    module = type(err).__module__ or ""
    # OSError: the machine's answer (missing file, permission, full or read-only disk), whoever
    # asked for it; its message names the errno and usually the file.
    if module.split(".")[0] in _OUR_PACKAGES or isinstance(err, OSError):
        return True
    # Our modules raise ValueError / KeyError for bad input with a message written for the user;
    # the same types raised deep inside a dependency are bugs and keep their traceback.
    return isinstance(err, (ValueError, KeyError)) and _raised_by_us(err)


def command_line() -> str:
    """The command line as typed, for provenance."""
    return " ".join(shlex.quote(a) for a in sys.argv)
