"""Errors meant for people: each says what was wrong, where, and what to do.

The CLI maps them to exit codes: InputError -> 2 (invalid spec, manifest, arguments, data),
RunError -> 1 (a failure while running).
"""

import contextlib
import signal
import threading
from typing import ClassVar, Self

from pydantic import BaseModel, ValidationError


class DictsweepError(Exception):
    """Base of the errors the CLI reports without a traceback."""

    exit_code = 1


class InputError(DictsweepError):
    """Invalid input: a spec field, a CLI argument, a manifest or a shard."""

    exit_code = 2


def option_errors(error, option) -> InputError:
    """A pydantic ValidationError of CLI options as one InputError naming each wrong option:
    `option(field)` gives the flag of a field (`max_tokens` -> `--max-tokens`)."""
    return InputError(
        "; ".join(
            f"{option('.'.join(map(str, item['loc'])))}: "
            f"{item['msg'].removeprefix('Value error, ')} (got {item.get('input')!r})"
            for item in error.errors()
        )
    )


class CliOptions(BaseModel):
    """A config built from a command's options: `from_cli` turns pydantic's errors into one InputError
    naming each wrong option. A field's flag is `--field-name` unless `flags` says otherwise."""

    flags: ClassVar[dict[str, str]] = {}

    @classmethod
    def flag(cls, field: str) -> str:
        """The option of a field's error location (`max_tokens` -> `--max-tokens`; a list item's, its list's)."""
        name = field.split(".")[0]
        return cls.flags.get(name, "--" + name.replace("_", "-"))

    @classmethod
    def from_cli(cls, **values) -> Self:
        try:
            return cls(**values)
        except ValidationError as error:
            raise option_errors(error, cls.flag) from None


def distinct(values: list[str], what: str) -> list[str]:
    """`values`, or a ValueError (a field error under pydantic) naming those given more than once."""
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise ValueError(f"{what} given more than once: {', '.join(repeated)}")
    return values


class DatasetError(InputError):
    """An activation dataset that cannot be read as it claims to be (names the file or shard)."""


class RunError(DictsweepError):
    """A failure while running (a trainer died, a sweep point failed, ...)."""

    exit_code = 1

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result  # what was produced before the failure, when there is something


class Interrupted(DictsweepError):
    """The driver was stopped by a signal (SIGTERM, SIGINT): exit 128 + its number, as shells do."""

    def __init__(self, signum: int, message: str | None = None):
        name = signal.Signals(signum).name
        super().__init__(message or f"stopped by {name}")
        self.signum, self.name = signum, name
        self.exit_code = 128 + signum


class _Stop(threading.local):
    """The main thread's stop state: how deep it is in `held_stop` blocks, a signal held there, the
    stop signal received (None before one), and whether our own code raised its stop (the handler's
    raise may land inside Ray, which can swallow it)."""

    depth = 0
    pending: int | None = None
    received: int | None = None
    raised = False


_stop = _Stop()


@contextlib.contextmanager
def stopped_by_signals():
    """SIGTERM and SIGINT raise Interrupted in the main thread (Ray's own SIGTERM handler would exit
    at once), so that a driver records what it holds before it goes. Inside `held_stop` the signal
    waits for the block's end."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return

    def stop(signum, frame):
        _stop.received = signum
        if _stop.depth:
            _stop.pending = signum
            return
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except BaseException as error:
        # inside Ray's blocking calls the handler's exception comes out as KeyboardInterrupt or a
        # SystemError: once a stop signal arrived, whatever ends the block is that stop
        if _stop.received is None or isinstance(error, Interrupted):
            raise
        raise Interrupted(_stop.received) from None
    else:
        if _stop.received is not None and not _stop.raised:  # the handler's raise was swallowed (by Ray)
            raise Interrupted(_stop.received)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _stop.pending = _stop.received = None
        _stop.raised = False


def check_stop() -> None:
    """At a safe point of a long loop: raise the stop for a signal whose exception did not get this
    far (Ray may swallow it, or turn it into an error that a handler for trainer failures takes)."""
    if _stop.received is not None and not _stop.depth:
        _stop.raised = True
        raise Interrupted(_stop.received)


@contextlib.contextmanager
def held_stop():
    """A block that a stop signal must not cut in half: a write to MLflow (whose store turns any
    exception inside a session into its own, and would hide the stop), a result being recorded.
    A signal that arrives inside it is raised when the outermost such block ends."""
    _stop.depth += 1
    try:
        yield
    finally:
        _stop.depth -= 1
        if not _stop.depth and _stop.pending is not None:
            signum, _stop.pending = _stop.pending, None
            _stop.raised = True
            raise Interrupted(signum)


def first_line(error: BaseException) -> str:
    """The last non-blank line of an error's text (where Ray puts the cause), at most 500 characters."""
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(error).__name__


def number_not_boolean(model, field: str, value):
    """`value` for `model.field` (a pydantic before-validator's input), or a ValueError when it holds
    true/false where the field means numbers: pydantic would read them as 1 and 0."""
    import typing

    def takes_bool(annotation) -> bool:
        return annotation is bool or any(takes_bool(arg) for arg in typing.get_args(annotation))

    values = value if isinstance(value, list) else [value]
    if any(isinstance(item, bool) for item in values) and not takes_bool(model.model_fields[field].annotation):
        raise ValueError(f"got {value!r}: true/false is not a number (pydantic would read 1/0); write the number")
    return value
