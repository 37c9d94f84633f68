"""The one base class of Buddy's errors: bad input or files, reported in one line (the CLI exits with 2)."""


class BuddyError(ValueError):
    """A value, file or model the user gave cannot be used; the message names it and what is allowed."""


class MissingExtraError(BuddyError):
    """A command needs an optional dependency group that is not installed."""


def require_extra(module: str, extra: str, what: str) -> None:
    """Raise MissingExtraError naming the pip command when `module` is not importable (checked before work)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(f"{what} needs the `{extra}` extra ({module} is not installed): "
                                f"pip install 'buddy[{extra}]' (`make setup` installs every extra)")
