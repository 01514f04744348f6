"""`mlx-kto chat`: a multi-turn terminal chat; one key decides each reply.

After each streamed reply, one key: u = thumbs up, d = thumbs down (the rating is
appended to the feedback file, durable before "saved" is printed, and the chat goes
on), r = regenerate (drops this reply), Enter = go on without rating, q = quit.
A rating closes the reply's menu, so whatever is typed next is the next message.
At the message prompt every letter is message text; only these lines are commands:
`/undo` (retract this session's latest rating, then rate that reply again or leave
it unrated), `/new` (a new conversation), `/quit`.

Ctrl-C while a reply streams stops that reply and shows its menu (the part shown
can be rated or regenerated); Ctrl-C at the menu or the message prompt leaves.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager

from mlx_kto.collect.session import ChatSession, Reply
from mlx_kto.collect.worker import StopFlag
from mlx_kto.errors import UserError

KEYS_HELP = "[u] thumbs up  [d] thumbs down  [r] regenerate  [Enter] go on unrated  [q] quit"
UNDO_HELP = "rate it again: [u] thumbs up  [d] thumbs down  [Enter] leave it unrated"
COMMANDS = "type /undo to retract your last rating, /new for a new conversation, /quit (or Ctrl-D) to leave"  # fmt: skip


def _read_key() -> str:
    """One key press on a terminal (keys typed while the reply streamed are kept, not
    flushed); the first character of a line otherwise."""
    if sys.stdin.isatty():
        import termios  # POSIX-only: imported where a terminal is in use

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        cbreak = termios.tcgetattr(fd)
        # One key without Enter, not echoed. Only ICANON and ECHO change (tty.setcbreak
        # also clears ICRNL on some Pythons: a typed-ahead Enter would then end no line);
        # TCSANOW, not TCSAFLUSH: keys typed ahead are kept.
        cbreak[3] &= ~(termios.ICANON | termios.ECHO)
        cbreak[6][termios.VMIN], cbreak[6][termios.VTIME] = 1, 0
        try:
            termios.tcsetattr(fd, termios.TCSANOW, cbreak)
            raw = os.read(fd, 1)
            more = 0 if raw < b"\xc0" else 1 if raw < b"\xe0" else 2 if raw < b"\xf0" else 3
            for _ in range(more):  # the rest of a UTF-8 character: one key, not several
                raw += os.read(fd, 1)
            ch = raw.decode("utf-8", "replace")
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
    """While a reply streams, keys pressed early are kept for the key menu but not
    echoed into the reply."""
    if not sys.stdin.isatty():
        yield
        return
    import termios  # POSIX-only

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # lflag
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


@contextmanager
def _ctrl_c_stops(stop: StopFlag):
    """Inside: Ctrl-C sets `stop` instead of raising KeyboardInterrupt at whatever line
    runs, so a reply stops cleanly (the generation thread ends at its next token)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_terminal_chat(
    session: ChatSession,
    echo: Callable[..., None] = print,
    read_line: Callable[[str], str] = input,
    read_key: Callable[[], str] = _read_key,
) -> int:
    """Run the chat until the user quits; returns the number of ratings saved (and
    not undone) this session."""
    rated: list[Reply] = []  # replies rated this session, oldest first (for /undo)
    echo(f"ratings go to {session.feedback}")
    echo(f"after each reply, one key: {KEYS_HELP}")
    echo(COMMANDS)
    while True:
        try:
            text = read_line("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            echo("")
            break
        command = text.strip()
        if not command:
            continue
        if command in ("/q", "/quit", "/exit"):
            break
        if command == "/new":  # a fresh conversation (the system prompt stays)
            session.messages = [m for m in session.messages if m["role"] == "system"]
            echo("(new conversation)")
            continue
        if command == "/undo":
            _undo_last(session, rated, echo, read_key)
            continue
        session.messages.append({"role": "user", "content": text})
        if _answer(session, rated, echo, read_key) == "quit":
            break
    n = sum(r.rating_id is not None for r in rated)
    echo(f"bye: {n} rating(s) saved this session to {session.feedback}")
    return n


def _answer(session: ChatSession, rated: list[Reply], echo, read_key) -> str:
    """Reply to the conversation's last user turn until the user keeps a reply
    ("go on") or quits ("quit")."""
    while True:  # one reply, possibly regenerated
        prompt = list(session.messages)
        stop = StopFlag()  # set by a signal handler: no lock (collect/worker.py)
        pieces: list[str] = []
        failed = None
        with _ctrl_c_stops(stop):  # also covers the moment the reply ends and the menu shows
            echo("assistant> ", end="", flush=True)
            with _no_echo():
                try:
                    for piece in session.stream(prompt, stop):
                        pieces.append(piece)
                        echo(piece, end="", flush=True)
                except Exception as e:  # a failed generation is one line, not a traceback
                    failed = f"{type(e).__name__}: {e}"
            echo(" [stopped]" if stop.is_set() else "")
            if failed:
                echo(f"  generation failed: {failed}")
                session.messages.pop()  # the question is not part of the conversation
                return "go on"
            reply = session.new_reply(prompt, "".join(pieces))
            echo(f"  {KEYS_HELP} > ", end="", flush=True)
        action = _reply_menu(session, reply, rated, echo, read_key)
        if action == "regenerate":
            continue
        if reply.text:
            session.messages.append({"role": "assistant", "content": reply.text})
        return action


def _rate(session: ChatSession, reply: Reply, label: bool, rated: list[Reply], echo) -> bool:
    """Save one rating; False (and why) when it was not saved."""
    try:
        session.rate(reply, label)
    except UserError as e:
        echo(f"  not saved: {e}")
        return False
    if reply in rated:
        rated.remove(reply)
    rated.append(reply)
    echo(f"  saved: {'thumbs up' if label else 'thumbs down'} -> {session.feedback}")
    return True


def _reply_menu(session: ChatSession, reply: Reply, rated: list[Reply], echo, read_key) -> str:
    """One decision about a reply (its menu already shown) -> "go on" | "regenerate" |
    "quit". A saved rating is the decision: the chat goes on."""
    while True:
        key = read_key()
        echo("")
        if key in ("u", "+", "d", "-"):
            if _rate(session, reply, key in ("u", "+"), rated, echo):
                return "go on"
        elif key == "r":
            return "regenerate"
        elif key in ("\n", " "):
            return "go on"
        elif key == "q":
            return "quit"
        else:
            echo(f"  unknown key {key!r}")
        echo(f"  {KEYS_HELP} > ", end="", flush=True)


def _undo_last(session: ChatSession, rated: list[Reply], echo, read_key) -> None:
    """/undo: retract this session's latest rating, then one key rates the reply again."""
    live = [r for r in rated if r.rating_id is not None]
    if not live:
        echo("  nothing to undo: no rating saved in this chat yet")
        return
    reply = live[-1]
    word = "thumbs up" if reply.label else "thumbs down"
    try:
        session.undo(reply)
    except UserError as e:
        echo(f"  not undone: {e}")
        return
    rated.remove(reply)
    short = reply.text if len(reply.text) <= 60 else reply.text[:57] + "..."
    echo(f"  undone: {word} on {short!r} (a retraction was appended to {session.feedback})")
    while True:
        echo(f"  {UNDO_HELP} > ", end="", flush=True)
        key = read_key()
        echo("")
        if key in ("u", "+", "d", "-"):
            if _rate(session, reply, key in ("u", "+"), rated, echo):
                return
        elif key in ("\n", " ", "q"):
            echo("  left unrated")
            return
        else:
            echo(f"  unknown key {key!r}")
