"""Errors a user can act on: the ``seqlab`` command prints their message in a few lines, with no
traceback (``seqlab --debug`` shows it), and exits with :attr:`SeqlabError.exit_code`.

Every message names what is wrong where: the key, the file, the record and the value, and the
fix where there is one. The classes also derive from the built-in exception a library caller
would expect (``ValueError``, ``FileNotFoundError``), so ``except ValueError`` keeps working.

    ConfigError     a key, value or argument of the command line or recipe     exit 2
    MissingInput    an input file or folder named by the user does not exist     exit 2
    DataError       an input file exists but cannot be used (empty, corrupt,     exit 1
                    malformed), naming file, record and value
    RunDirError     the run directory refuses this start: held by another run,   exit 1
                    its config differs from the one given, no intact checkpoint
    CheckpointError a checkpoint is corrupt, incomplete or unsafe to read         exit 1
"""
from __future__ import annotations


class SeqlabError(Exception):
    """Base of the errors the command line reports as one short message."""

    exit_code = 1


class ConfigError(SeqlabError, ValueError):
    """A usage error: an unknown or mistyped key, a missing mandatory value, a bad value."""

    exit_code = 2


class MissingInput(SeqlabError, FileNotFoundError):
    """A file or folder the user named (in a recipe, override or argument) is not there."""

    exit_code = 2


class DataError(SeqlabError, ValueError):
    """An input file that exists but cannot be used; the message names file, record and value."""


class RunDirError(SeqlabError):
    """The run directory cannot be used for this start; nothing in it was changed."""


class CheckpointError(SeqlabError, ValueError):
    """A checkpoint that fails verification, or names files outside its own folder."""


__all__ = ["SeqlabError", "ConfigError", "MissingInput", "DataError", "RunDirError",
           "CheckpointError"]
