"""Errors meant for people: each says what was wrong, where, and what to do.

The CLI maps them to exit codes: InputError -> 2 (invalid spec, manifest, arguments, data),
RunError -> 1 (a failure while running).
"""


class DictsweepError(Exception):
    """Base of the errors the CLI reports without a traceback."""

    exit_code = 1


class InputError(DictsweepError):
    """Invalid input: a spec field, a CLI argument, a manifest or a shard."""

    exit_code = 2


def option_errors(error, option) -> InputError:
    """A pydantic ValidationError of CLI options as one InputError naming each wrong option:
    `option(field)` gives the flag of a field (`max_tokens` -> `--max-tokens`)."""
    return InputError("; ".join(f"{option('.'.join(map(str, item['loc'])))}: "
                                f"{item['msg'].removeprefix('Value error, ')} (got {item.get('input')!r})"
                                for item in error.errors()))


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


def first_line(error: BaseException) -> str:
    """The last non-blank line of an error's text (where Ray puts the cause), at most 500 characters."""
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(error).__name__
