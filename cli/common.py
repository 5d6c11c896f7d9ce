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
    checkpoints, frames, heads); each already says what went wrong and where.
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
                raise click.ClickException(str(err)) from err
            raise

    return wrapper


def _is_domain_error(err: BaseException) -> bool:
    module = type(err).__module__ or ""
    return module.split(".")[0] in ("featstore", "heads") or isinstance(err, (FileNotFoundError, PermissionError))


def command_line() -> str:
    """The command line as typed, for provenance."""
    return " ".join(shlex.quote(a) for a in sys.argv)
