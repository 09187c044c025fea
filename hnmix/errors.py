"""The errors a user can cause and fix. Each is reported as one line, without a traceback.

Programming errors are not wrapped: they keep their traceback.
"""

import sys
from typing import Callable


class HnmixError(Exception):
    """A problem with what the user asked for; the message says what was wrong and how to fix it."""


class ConfigError(HnmixError):
    """An option, a config file or a combination of options is invalid."""


class DataError(HnmixError):
    """The dataset cannot be found, reached or used (path, Hub id, split, columns, images)."""


class CheckpointError(HnmixError):
    """A checkpoint cannot be written (disk full, unwritable directory)."""


class TrainingDivergedError(HnmixError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class HubError(HnmixError):
    """The Hugging Face Hub cannot be used as asked (token, repo id, network)."""


def exit_code(work: Callable[[], object]) -> int:
    """A command line's exit code: 0 after `work()`, or 2 after writing the HnmixError it raised
    as one line on stderr, `hnmix: error: ...` (its last line: an error raised in a DataLoader
    worker arrives with the worker's traceback before it)."""
    try:
        work()
    except HnmixError as error:
        sys.stderr.write(f"hnmix: error: {str(error).strip().splitlines()[-1]}\n")
        return 2
    return 0


def describe(error: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, shortened to `limit` characters: for one-line reports."""
    line = first_line(error, limit)
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def first_line(error: BaseException, limit: int = 200) -> str:
    lines = str(error).strip().splitlines()
    line = lines[0].strip() if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def network_error_types() -> tuple[type[BaseException], ...]:
    """What a failed Hub or file access raises. OSError covers ConnectionError, TimeoutError,
    huggingface_hub's HfHubHTTPError and OfflineModeIsEnabled and datasets' DatasetNotFoundError;
    the transport errors of httpx2/httpx (huggingface_hub 2.x's HTTP client) are not OSErrors."""
    types: list[type[BaseException]] = [OSError]
    for module_name in ("httpx2", "httpx"):
        try:
            types.append(__import__(module_name).HTTPError)
        except ImportError:
            continue
    return tuple(types)
