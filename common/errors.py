"""One small hierarchy of errors a user can act on.

Messages name the thing, the number found and the number expected, e.g.
"tensor blk.3.attn_q.weight: expected 4096x4096 q4_0, found 4096x4000".
The CLI catches DllamaError once, at the edge, prints the message on one line and
exits with the class's exit code; `--debug` shows the traceback.
"""
from __future__ import annotations

# Named exit codes (also documented in `dllama-ctl --help`).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_TOKENIZER = 4
EXIT_MEMORY = 5
EXIT_CLUSTER = 6
EXIT_INTERRUPTED = 130


class DllamaError(Exception):
    """An error with a message meant for the user."""

    exit_code = EXIT_FAILURE


class UsageError(DllamaError):
    """An option or request value is out of range."""

    exit_code = EXIT_USAGE


class ContextFullError(UsageError):
    """A prompt or conversation leaves no room for an answer in the context."""


class ModelFileError(DllamaError):
    """The model file is missing, truncated or malformed."""

    exit_code = EXIT_MODEL


class UnsupportedModelError(ModelFileError):
    """The model's architecture or a tensor's type is not one we run."""


class TokenizerError(DllamaError):
    """The tokenizer is missing, broken, or does not match the model."""

    exit_code = EXIT_TOKENIZER


class MemoryPlanError(DllamaError):
    """What was asked for does not fit the memory available."""

    exit_code = EXIT_MEMORY


class ClusterError(DllamaError):
    """A peer is unreachable, vanished, or broke the protocol."""

    exit_code = EXIT_CLUSTER


class ProtocolError(ClusterError):
    """A peer sent bytes that are not our protocol, or another version of it."""
