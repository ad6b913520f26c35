"""Exceptions for mistakes a user can fix: the CLI prints them as one line."""


class UserError(Exception):
    """Bad input (config, flags, files); the message says what to change."""


class ConfigError(UserError, ValueError):
    """A config field holds a value maejax cannot run with.

    The message always names the field, the value it holds and what would be
    valid, so the CLI can print it as one line without a traceback.
    """

    def __init__(self, field: str, value, valid: str):
        self.field = field
        self.value = value
        self.valid = valid
        super().__init__(f"config.{field}={value!r} is invalid: {valid}")

    def __reduce__(self):
        # Raised in a loader's worker process, it crosses back to the training process by pickle.
        return type(self), (self.field, self.value, self.valid)
