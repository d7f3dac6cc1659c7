"""Error types the CLI maps to exit codes: usage/config errors exit 2, failed data or training exit 1.

Every message is one line that names what is wrong and where (file, line, key, step).
"""


class ConfigError(ValueError):
    """Bad configuration or usage: unknown key, wrong type, missing path. Exit code 2."""

    exit_code = 2


class DataError(RuntimeError):
    """Data that cannot be used: empty or binary corpus, malformed JSONL, failed expectations. Exit code 1."""

    exit_code = 1


class TrainingError(RuntimeError):
    """A training stage that cannot go on: NaN loss, empty dataset, mismatched tokenizer. Exit code 1."""

    exit_code = 1


class TrackingError(RuntimeError):
    """The MLflow store cannot be reached or read (server down, locked database, registry error). Exit code 1.

    Raised instead of guessing: a registry that cannot be read is never taken to mean "no champion".
    """

    exit_code = 1


class BusyError(RuntimeError):
    """The project is busy: another lifecycle holds its lock (names the holder's pid, host and start). Exit 1."""

    exit_code = 1
