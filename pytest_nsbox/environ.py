"""The environment a command in a box starts with.

In a module of its own because three places need the same answer: the box's init, which
builds it for every command; the host, which names the PATH searched when a program is not
found; and ``nsbox shell``. Loaded by the box helper: standard library only (none, in fact).
"""

from __future__ import annotations

# Docker's default PATH, given when neither the image nor the caller sets one.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def command_env(
    image_env: dict[str, str],
    hostname: str,
    home: str,
    user_given: bool,
    box_env: dict[str, str],
    run_env: dict[str, str],
) -> dict[str, str]:
    """Layered as Docker does: a default PATH, the image's Env, HOSTNAME (and HOME, unless the
    image sets it and no user was asked for), the box's env, then the command's own."""
    env = {"PATH": DEFAULT_PATH}
    env.update(image_env)
    env["HOSTNAME"] = hostname
    if user_given or "HOME" not in env:
        env["HOME"] = home
    env.update(box_env)
    env.update(run_env)
    return env


__all__ = ["DEFAULT_PATH", "command_env"]
