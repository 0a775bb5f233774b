"""The small hierarchy of errors loragate raises on purpose.

Every error a user can cause (bad config, a port taken, an endpoint down) is a
:class:`LoragateError` with a message that says what to do; the CLI prints it and exits
non-zero without a traceback.
"""


class LoragateError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class UsageError(LoragateError):
    """The command was given wrong or missing options; nothing was started or changed."""


class ContractError(LoragateError):
    """An adapters file (contract) is missing, malformed or inconsistent."""


class StackError(LoragateError):
    """The local stack could not be started, reached or stopped."""


class PortInUseError(StackError):
    """A port the stack needs is already bound by another process."""


class EngineStartError(StackError):
    """vLLM exited or never became healthy; the message points at its log."""


class BuildError(LoragateError):
    """Building the demo model, tokenizer or adapters failed."""


class GateError(LoragateError):
    """The gate could not reach a verdict; a gate error is never a pass."""
