"""Pieces shared by the click front-ends: error translation, shared parameter types, and a
command's parameters rendered back to the command line that gives them."""
from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

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
        except (KeyboardInterrupt, SystemExit, BrokenPipeError):
            raise  # a closed pipe is the reader's normal end: click exits quietly
        except Exception as err:  # noqa: BLE001 - filtered just below
            if _is_domain_error(err):
                message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
                raise click.ClickException(str(message)) from err
            raise

    return wrapper


class GuardedGroup(click.Group):
    """A program (``featstore``, ``heads``) whose commands never show a user a traceback.

    The one entry point of every command: an exception that no command turned into a message (a
    bug, or an input nobody anticipated) becomes one line naming the command and the cause, plus
    the file its full traceback was written to, exit status 1; ``--debug`` (or ``FEATSTORE_DEBUG=1``)
    lets it through instead. Usage errors, domain errors and a closed output pipe pass untouched.
    """

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; an unexpected exception becomes one line (see the class)."""
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            raise  # click's main exits quietly on EPIPE, as other Unix tools do
        except Exception as err:  # noqa: BLE001 - the last guard; the traceback is kept in a file
            if ctx.params.get("debug"):
                raise
            name = " ".join(filter(None, [ctx.info_name, ctx.invoked_subcommand]))
            saved = _save_traceback(name, err)
            where = f"full traceback in {saved}" if saved is not None else "no traceback file could be written"
            raise click.ClickException(f"`{name}` failed unexpectedly: {type(err).__name__}: {_one_line(err)} "
                                       f"({where}; rerun with --debug to see it)") from err


def debug_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--debug`` on a program: show an unexpected error's traceback instead of one line."""
    return click.option("--debug", is_flag=True, envvar="FEATSTORE_DEBUG", show_envvar=True,
                        help="Show the full traceback of an unexpected error instead of one line.")(func)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("..." if len(text) > 300 else "") if text else "(no message)"


def _save_traceback(name: str, err: BaseException) -> Path | None:
    import tempfile
    import time
    import traceback

    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(tempfile.gettempdir()) / f"{name.replace(' ', '-')}-{stamp}-{os.getpid()}.traceback.txt"
    try:
        path.write_text(f"{command_line()}\n\n" + "".join(traceback.format_exception(err)), encoding="utf-8")
    except OSError:
        return None
    return path


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


@contextlib.contextmanager
def removed_on_early_failure(path: str | os.PathLike, kind: str) -> Iterator[None]:
    """Remove the output folder this command made when it fails before writing any result.

    A refused or failed command leaves no trace, so the corrected command is not refused in turn
    ("already holds a run", "not empty and not a store"). A folder that existed before, or one that
    holds a result (a stored segment; a checkpoint or resume state), is left for a rerun or
    ``--resume`` to continue. Only the main process of a torchrun world removes anything.

    Args:
        path: the folder the command writes (a store, a run).
        kind: ``"store"`` or ``"run"``: what counts as a result.
    """
    path = Path(path)
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed and path.is_dir() and os.environ.get("RANK", "0") == "0" and not _holds_result(path, kind):
            shutil.rmtree(path, ignore_errors=True)
        raise


def _holds_result(path: Path, kind: str) -> bool:
    if kind == "run":
        from featstore.training.run_folder import CHECKPOINT_NAME, RESUME_STATE_NAME

        return (path / CHECKPOINT_NAME).exists() or (path / RESUME_STATE_NAME).exists()
    from featstore.store.reader import FeatureStore

    try:
        return len(FeatureStore.open(path).segments()) > 0
    except Exception:  # noqa: BLE001 - unreadable: keep it, it may hold what a rerun recovers
        return (path / "lmdb").is_dir() and any((path / "lmdb").rglob("data.mdb"))


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


class FiniteFloatRange(click.FloatRange):
    """A float inside a range that is also finite: ``--lr inf`` or ``nan`` is a usage error, not a NaN run."""

    name = "float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        """The float, refused when it is nan or infinite, then checked against the range."""
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


# The ranges of the numbers every trainer and extractor takes; one place, so the commands agree.
LEARNING_RATE = FiniteFloatRange(min=0, min_open=True)
MOMENTUM = FiniteFloatRange(min=0, max=1, max_open=True)
WEIGHT_DECAY = FiniteFloatRange(min=0)
FRACTION = FiniteFloatRange(min=0, max=1)
POSITIVE = FiniteFloatRange(min=0, min_open=True)  # seconds, frame rates, gigabytes
COUNT = click.IntRange(min=1)  # sizes, frames, batches, epochs
SEED = click.IntRange(min=0)


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


def _flag_argv(command: click.Command, option: click.Option, value: Any) -> list[str]:
    """The one flag of ``option`` (``--x`` or ``--no-x``) whose parse gives ``value``.

    Found by parsing each of the option's flags with the command itself (click's public parsing),
    not by reading click's attributes for what a flag sets, whose meaning changes between releases.
    """
    flags = [*option.opts, *option.secondary_opts]
    for flag in sorted(flags, key=lambda o: not o.startswith("--")):
        parsed = command.make_context(command.name or "command", [flag], resilient_parsing=True).params
        if parsed.get(option.name) == value and type(parsed.get(option.name)) is type(value):
            return [flag]
    shown = "/".join(flags)
    raise ValueError(f"option {shown} cannot give {option.name} = {value!r}")


def _option_argv(command: click.Command, option: click.Option, value: Any) -> list[str]:
    flag = next((o for o in option.opts if o.startswith("--")), option.opts[0])
    if option.count:
        return [flag] * int(value)
    if option.is_flag:
        return _flag_argv(command, option, value)
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
            options += _option_argv(command, param, value)
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


# The one rule behind every --amp default, in the help of each command that has the option (a test
# checks that they state it): extraction and training want different half-precision types.
AMP_RULE = ("Defaults: fp16 to extract (featstore build: the store keeps features as float16, whose 10-bit "
            "mantissa fp16 keeps and bf16's 7 bits would round away), bf16 to train (featstore finetune, "
            "finetune-detector: fp32's exponent range, so no gradient scaler; fp16 trains with one). bf16 needs "
            "an Ampere or newer GPU; the CPU always runs fp32.")


def run_output_options() -> list[Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """What every trainer's command offers about its outputs: TensorBoard scalars, the checkpoint's
    precision, keeping the resume state (`heads train` and both stage-1 commands)."""
    return [
        click.option("--tensorboard", type=click.Path(file_okay=False, path_type=Path),
                     help="Also log each epoch's loss, learning rate and validation metrics to this folder as "
                          "TensorBoard scalars (needs pip install 'featstore[tensorboard]'), e.g. "
                          "--tensorboard tb/run1, then tensorboard --logdir tb."),
        click.option("--half-checkpoint", is_flag=True,
                     help="Write OUT/checkpoint.pt's weights in half precision (half the size; loading casts back)."),
        click.option("--keep-resume-state", is_flag=True,
                     help="Keep OUT/checkpoints/last.pt (weights, optimiser, random state) when the run finishes, "
                          "to extend it later with --resume; by default it is deleted."),
    ]


def run_outputs(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a trainer's command with `run_output_options` (``--tensorboard``, ``--half-checkpoint``,
    ``--keep-resume-state``)."""
    for option in reversed(run_output_options()):
        func = option(func)
    return func


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
                     help=f"Autocast dtype on CUDA (fp16 with a gradient scaler). {AMP_RULE}"),
        click.option("--seed", type=SEED, default=0, show_default=True, help=f"Seeds {seeds}."),
        click.option("--max-failed-fraction", type=FRACTION, default=0.01, show_default=True,
                     help=f"Stop when more than this share of a round's {items} cannot be read."),
        click.option("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint."),
        click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr."),
        *run_output_options(),
    ]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate
