"""Field names as users type them, and errors that name them.

`flag(name)` is the CLI flag of a config field; `bad(name, msg)` the one-line UserError that
names the flag and the field, so YAML users and flag users both recognise it.
"""

from __future__ import annotations

from mlx_kto.errors import UserError

# Field -> flag where the flag is not `--` + the field name with dashes (cli.py builds one
# flag per field that way, so none differ today; add any that ever do).
FLAGS: dict[str, str] = {}


def flag(name: str) -> str:
    """The flag a user types for config field `name` (`q_group_size` -> `--q-group-size`)."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def bad(name: str, msg: str) -> UserError:
    """A UserError naming the flag and, for YAML users, the field: `--seed (seed): ...`."""
    return UserError(f"{flag(name)} ({name}): {msg}")
