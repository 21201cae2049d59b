"""The one error the registry raises: it says what failed and what to do about it."""

from __future__ import annotations


class RegistryError(RuntimeError):
    """A registry operation failed or was refused; the message names the cause and the fix."""
