"""`mlx-kto chat`: a multi-turn terminal chat; one key rates each reply.

After each streamed reply: u = thumbs up, d = thumbs down (each appended to the
feedback file, durable before "saved" is printed), r = regenerate (drops this
reply), Enter = go on (keeps it in the conversation), q = quit. `/new` starts a
new conversation. Rating a reply
again replaces the earlier rating (a retraction is appended).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import contextmanager

from mlx_kto.collect.session import ChatSession
from mlx_kto.errors import UserError

KEYS_HELP = "[u] thumbs up  [d] thumbs down  [r] regenerate  [Enter] go on  [q] quit"


def _read_key() -> str:
    """One key press on a terminal (keys typed while the reply streamed are kept, not
    flushed); the first character of a line otherwise."""
    if sys.stdin.isatty():
        import termios
        import tty

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        try:
            tty.setcbreak(fd, termios.TCSANOW)  # no TCSAFLUSH: keep typeahead
            ch = os.read(fd, 1).decode("utf-8", "replace")
        except KeyboardInterrupt:
            return "q"
        finally:
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        if ch in ("", "\x04"):  # EOF / Ctrl-D
            return "q"
        return "\n" if ch in ("\r", "\n") else ch.lower()
    line = sys.stdin.readline()
    if line == "":
        return "q"
    return line[0].lower() if line.strip() else "\n"


@contextmanager
def _no_echo():
    """While a reply streams, keys pressed early are kept for the rating prompt but
    not echoed into the reply."""
    if not sys.stdin.isatty():
        yield
        return
    import termios

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # lflag
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def run_terminal_chat(
    session: ChatSession,
    echo: Callable[..., None] = print,
    read_line: Callable[[str], str] = input,
    read_key: Callable[[], str] = _read_key,
) -> int:
    """Run the chat until the user quits; returns the number of ratings saved."""
    n_rated = 0
    echo(f"ratings go to {session.feedback}")
    echo(f"after each reply: {KEYS_HELP}")
    echo("type /new for a new conversation, /quit (or Ctrl-D) to leave")
    while True:
        try:
            text = read_line("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            echo("")
            break
        if not text.strip():
            continue
        if text.strip() in ("/q", "/quit", "/exit"):
            break
        if text.strip() == "/new":  # a fresh conversation (the system prompt stays)
            session.messages = [m for m in session.messages if m["role"] == "system"]
            echo("(new conversation)")
            continue
        session.messages.append({"role": "user", "content": text})
        quit_now = False
        while True:  # one reply, possibly regenerated
            prompt = list(session.messages)
            echo("assistant> ", end="", flush=True)
            pieces = []
            try:
                with _no_echo():
                    for piece in session.stream(prompt):
                        pieces.append(piece)
                        echo(piece, end="", flush=True)
            except KeyboardInterrupt:
                echo(" [stopped]", end="")
            echo("")
            reply = session.new_reply(prompt, "".join(pieces))
            action = _rate_loop(session, reply, echo, read_key)
            n_rated += action[1]
            if action[0] == "regenerate":
                continue
            if reply.text:
                session.messages.append({"role": "assistant", "content": reply.text})
            quit_now = action[0] == "quit"
            break
        if quit_now:
            break
    echo(f"bye: {n_rated} rating(s) saved this session to {session.feedback}")
    return n_rated


def _rate_loop(session: ChatSession, reply, echo, read_key) -> tuple[str, int]:
    """Keys after one reply -> ("go on" | "regenerate" | "quit", ratings saved)."""
    saved = 0
    while True:
        echo(f"  {KEYS_HELP} > ", end="", flush=True)
        key = read_key()
        echo("")
        if key in ("u", "+", "d", "-"):
            label = key in ("u", "+")
            try:
                was_rated = reply.rating_id is not None
                session.rate(reply, label)
            except UserError as e:
                echo(f"  not saved: {e}")
                continue
            saved += 0 if was_rated else 1
            word = "thumbs up" if label else "thumbs down"
            echo(f"  saved: {word} -> {session.feedback}")
        elif key == "r":
            return "regenerate", saved
        elif key in ("\n", "c", " "):
            return "go on", saved
        elif key == "q":
            return "quit", saved
        else:
            echo(f"  unknown key {key!r}")
