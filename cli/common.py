"""Pieces shared by the click front-ends: error translation, shared parameter types, and a
command's parameters rendered back to the command line that gives them."""
from __future__ import annotations

import functools
import os
import shlex
import sys
from typing import Any, Callable, Iterable, Mapping

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


_OUR_PACKAGES = ("featstore", "heads", "finetune", "cli")


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


# ------------------------------------------------------------------------------------------------
# A command's parameters as one dict: what a script (the demo) fills in, what the command's own
# config builder reads, and, rendered back to argv, the command line it is equivalent to.


class IntList(click.ParamType):
    """A comma-separated list of integers, e.g. ``--lr-steps 11,14`` -> ``(11, 14)`` ("" -> ``()``)."""

    name = "INTS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        """``"11,14"`` (or an already parsed sequence) -> ``(11, 14)``."""
        parts = value if isinstance(value, (tuple, list)) else str(value).split(",")
        try:
            return tuple(int(part) for part in parts if str(part).strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)

    def render(self, value: tuple[int, ...]) -> str:
        """The command-line text that `convert` reads back as ``value``."""
        return ",".join(str(v) for v in value)


def command_defaults(command: click.Command) -> dict[str, Any]:
    """What each parameter of ``command`` holds when the command line does not give it.

    Args:
        command: a click command.
    Returns:
        parameter name -> its parsed default (None for a required parameter without one): the
        values click itself would pass (types converted).
    """
    return dict(command.make_context(command.name or "command", [], resilient_parsing=True).params)


def command_params(command: click.Command, **given: Any) -> dict[str, Any]:
    """Every parameter ``command`` would receive: its defaults, with ``given`` in their place.

    The dict a script builds once to drive a command's library call (through the command's own
    config builder) and to print the equivalent command line (`format_command`).

    Args:
        command: a click command.
        given: parameter names (as the command's function receives them) -> values.
    Returns:
        parameter name -> value, for every parameter the command declares.
    Raises:
        ValueError: a name in ``given`` that the command does not declare.
    """
    params = command_defaults(command)
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise ValueError(f"command {command.name!r} has no parameter(s) {', '.join(unknown)}; "
                         f"it takes {', '.join(params)}")
    params.update(given)
    return params


def _render_value(param: click.Parameter, value: Any) -> str:
    render = getattr(param.type, "render", None)
    if callable(render):
        return render(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)  # str(float) is the shortest text that reads back as the same float


def _option_argv(option: click.Option, value: Any) -> list[str]:
    flag = next((o for o in option.opts if o.startswith("--")), option.opts[0])
    if option.count:
        return [flag] * int(value)
    if option.is_flag:
        if option.secondary_opts and value == (not option.flag_value):
            return [next((o for o in option.secondary_opts if o.startswith("--")), option.secondary_opts[0])]
        if value == option.flag_value:
            return [flag]
        raise ValueError(f"option {flag} cannot give {option.name} = {value!r} (it only sets {option.flag_value!r})")
    values = list(value) if option.multiple else [value]
    argv = []
    for item in values:
        items = list(item) if option.nargs != 1 else [item]
        argv += [flag, *(_render_value(option, v) for v in items)]
    return argv


def command_argv(command: click.Command, params: Mapping[str, Any], *, always: Iterable[str] = ()) -> list[str]:
    """The arguments that make ``command`` parse exactly ``params`` (parameters at their default omitted).

    Driven by the command's own declarations (option names, ``--x/--no-x`` and single flags,
    ``multiple``, ``nargs``, counts), so it follows whatever options the command declares.

    Args:
        command: a click command.
        params: parameter name -> value, e.g. from `command_params`.
        always: parameters written out even at their default (for a reader: ``--model saoa``).
    Returns:
        argv without the program name: the positional arguments (as in the command's usage line),
        then the options in declaration order; the arguments go last, after ``--``, when one of
        them starts with ``-``.
    Raises:
        ValueError: a parameter the command does not declare, or a value no command line can give
            (a flag's other value, None in place of a default).
    """
    defaults = command_defaults(command)
    always = set(always)
    unknown = sorted((set(params) | always) - set(defaults))
    if unknown:
        raise ValueError(f"command {command.name!r} has no parameter(s) {', '.join(unknown)}")
    options: list[str] = []
    arguments: list[str] = []
    # get_params, not .params: a command may add parameters when it runs (`heads train` reads its
    # --model choices and head switches from the registry then).
    declared = command.get_params(click.Context(command, info_name=command.name))
    for param in declared:
        if param.name not in params or not param.expose_value:
            continue
        value = params[param.name]
        if isinstance(param, click.Argument):
            if value is None and not param.required:
                continue
            values = list(value) if param.nargs != 1 else [value]
            if any(v is None for v in values):
                raise ValueError(f"argument {param.name.upper()} of {command.name!r} has no value")
            arguments += [_render_value(param, v) for v in values]
        else:
            default = defaults[param.name]
            at_default = value == default and type(value) is type(default)
            # A lone flag at its default has nothing to write; None is no option's text.
            shown = param.name in always and value is not None and not (param.is_flag and not param.secondary_opts)
            if at_default and not shown:
                continue
            if value is None:
                raise ValueError(f"option {param.opts[0]} of {command.name!r} cannot be set back to None "
                                 f"(its default is {default!r})")
            options += _option_argv(param, value)
    if any(a.startswith("-") for a in arguments):
        return [*options, "--", *arguments]
    return arguments + options


def format_command(prog: str, command: click.Command, params: Mapping[str, Any], *,
                   always: Iterable[str] = ()) -> str:
    """The shell command line equivalent to ``params``, e.g. ``featstore build STORE --annotations ...``.

    Args:
        prog: what precedes the command's own arguments, e.g. ``"featstore build"``.
        command: the click command.
        params: parameter name -> value (see `command_argv`).
        always: parameters written out even at their default.
    Returns:
        One line, quoted for a POSIX shell.
    """
    return shlex.join([*shlex.split(prog), *command_argv(command, params, always=always)])


def stage1_run_options(*, items: str, seeds: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options every stage-1 command shares: decode workers, device, AMP, seed, failures, resume, progress.

    Args:
        items: what a run reads (``segments``, ``images``), for the failure option's help.
        seeds: what ``--seed`` seeds, for its help.
    """
    options = [
        click.option("--workers", type=click.IntRange(min=0), default=4, show_default=True,
                     help="Decode worker processes (0: decode in the main process)."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                     help="Device to train on (under torchrun each rank takes its local GPU)."),
        click.option("--amp", type=click.Choice(["bf16", "fp16", "off"]), default="bf16", show_default=True,
                     help="Autocast dtype on CUDA (fp16 with a gradient scaler); the CPU trains in fp32."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help=f"Seeds {seeds}."),
        click.option("--max-failed-fraction", type=click.FloatRange(0, 1), default=0.01, show_default=True,
                     help=f"Stop when more than this share of a round's {items} cannot be read."),
        click.option("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint."),
        click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr."),
    ]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate
