"""`dllama-ctl chat` through the daemon: reading messages, the slash commands, streaming
answers, Ctrl-C.

The conversation is a list of {"role", "content"} messages kept here and sent whole each
turn (the daemon reuses its KV cache for the common prefix). Input:

    a line ending in a backslash continues on the next line
    \"\"\" on a line opens a block that the next line ending in \"\"\" closes
    /reset, /system TEXT, /help, /exit (or Ctrl-D)

Ctrl-C while an answer streams closes the connection (the daemon cancels the generation)
and keeps the session; the part already written stays in the conversation. Ctrl-C at the
prompt drops the line being typed.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Iterator, List, Optional

from dllama_node.tokenizer.conversation_fit import dropped_note, stopped_note

log = logging.getLogger(__name__)

BLOCK = '"""'
PROMPT = "> "
CONTINUE_PROMPT = "... "
HELP = """\
/reset         forget the conversation (keeps the system prompt)
/system TEXT   set the system prompt and start over (/system alone removes it)
/help          this text
/exit          leave (or Ctrl-D)
A line ending in \\ continues on the next line; \"\"\" opens and closes a block of lines.
Ctrl-C stops the answer being written, not the session."""

ReadLine = Callable[[str], str]        # prompt -> line without its newline; EOFError at the end


class MessageReader:
    """Whole messages from a line reader: continuation lines and \"\"\" blocks joined."""

    def __init__(self, read_line: ReadLine):
        self.read_line = read_line

    def read(self) -> Optional[str]:
        """The next message (may be empty or blank), or None at the end of input."""
        try:
            line = self.read_line(PROMPT)
        except EOFError:
            return None
        stripped = line.strip()
        if stripped.startswith(BLOCK):
            return self._block(stripped[len(BLOCK):])
        parts = []
        while line.endswith("\\"):
            parts.append(line[:-1])
            try:
                line = self.read_line(CONTINUE_PROMPT)
            except EOFError:
                line = ""
                break
        parts.append(line)
        return "\n".join(parts)

    def _block(self, first: str) -> str:
        if first.rstrip().endswith(BLOCK):               # """one line"""
            return first.rstrip()[:-len(BLOCK)]
        lines = [first] if first else []
        while True:
            try:
                line = self.read_line(CONTINUE_PROMPT)
            except EOFError:
                break                                    # an unclosed block ends with the input
            if line.rstrip().endswith(BLOCK):
                tail = line.rstrip()[:-len(BLOCK)]
                if tail:
                    lines.append(tail)
                break
            lines.append(line)
        return "\n".join(lines)


class ChatSession:
    """The conversation and what each input does to it.

    `send(messages)` starts a generation and returns the answer lines ({"text"} pieces,
    then the final {"done": true, "text", "finish_reason", ...}); `write(text)` prints
    the answer, `note(text)` a line for the person (stderr)."""

    def __init__(self, send: Callable[[List[Dict[str, str]]], Iterator[dict]],
                 write: Callable[[str], None], note: Callable[[str], None],
                 system: Optional[str] = None):
        self.send = send
        self.write = write
        self.note = note
        self.system = system or None
        self.messages: List[Dict[str, str]] = self._start()

    def _start(self) -> List[Dict[str, str]]:
        self.told_dropped = False       # the left-out turns are told once per conversation
        return [{"role": "system", "content": self.system}] if self.system else []

    def _tell_dropped(self, line: dict) -> None:
        """The answerer left the oldest turns out (tokenizer/conversation_fit.py): say so,
        the first time in this conversation."""
        if line.get("dropped_turns") and not self.told_dropped:
            self.told_dropped = True
            self.note(dropped_note(int(line["dropped_turns"]), line.get("max_seq_len")))

    def handle(self, text: str) -> bool:
        """Act on one message or command; False when the session should end."""
        stripped = text.strip()
        if not stripped:
            return True
        if stripped.startswith("/") and not stripped.startswith("//"):
            return self._command(stripped)
        if stripped.startswith("//"):                    # "//x" sends "/x"
            text = text.replace("//", "/", 1)
        self.messages.append({"role": "user", "content": text})
        self.answer()
        return True

    def _command(self, stripped: str) -> bool:
        name, _, arg = stripped.partition(" ")
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/reset":
            self.messages = self._start()
            self.note("(conversation forgotten)")
        elif name == "/system":
            self.system = arg.strip() or None
            self.messages = self._start()
            self.note("(system prompt set; conversation started over)" if self.system
                      else "(system prompt removed; conversation started over)")
        elif name in ("/help", "/?"):
            self.note(HELP)
        else:
            self.note(f"(unknown command {name}: /help lists them; start a message with // "
                      "to send a leading /)")
        return True

    def answer(self) -> None:
        """Stream one answer; on Ctrl-C stop it, keep what was written."""
        pieces: List[str] = []
        final: Optional[dict] = None
        lines = self.send(list(self.messages))
        try:
            for line in lines:
                self._tell_dropped(line)
                if line.get("done"):
                    final = line
                    break
                piece = line.get("text") or ""
                if piece:
                    pieces.append(piece)
                    self.write(piece)
        except KeyboardInterrupt:
            close = getattr(lines, "close", None)
            if close is not None:
                close()                                  # the daemon sees the socket close
            self.write("\n")
            self.note("[stopped]")
        except BaseException:
            self.messages.pop()                          # the question got no answer
            raise
        else:
            self.write("\n")
            if final is not None and final.get("finish_reason") == "length":
                self.note(stopped_note(final.get("limit"), final.get("max_seq_len"),
                                       final.get("max_tokens")))
        text = final.get("text", "".join(pieces)) if final is not None else "".join(pieces)
        self.messages.append({"role": "assistant", "content": text})


def history_path() -> str:
    """~/.local/state/dllama-node/history (XDG_STATE_HOME respected)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                             ".local", "state")
    return os.path.join(state, "dllama-node", "history")


def setup_history(path: Optional[str] = None) -> Callable[[], None]:
    """Load readline history; returns a function that saves it. Quietly does nothing where
    readline is missing or the folder cannot be written."""
    try:
        import readline
    except ImportError:                                  # pragma: no cover - always on Linux
        return lambda: None
    path = path or history_path()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(2000)

    def save() -> None:
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            readline.write_history_file(path)
        except OSError as e:
            log.debug("chat history not saved to %s: %s", path, e)
    return save


def run_chat(session: ChatSession, read_line: ReadLine, note: Callable[[str], None],
             interactive: bool = True) -> None:
    """The loop: read a message, handle it, until /exit or the end of input. Interactive,
    an error the daemon answers is shown and the session goes on; otherwise it ends the
    command (with the error's exit code)."""
    from dllama_node.common.errors import DllamaError

    reader = MessageReader(read_line)
    while True:
        try:
            text = reader.read()
        except KeyboardInterrupt:
            note("\n(Ctrl-D or /exit leaves)")
            continue
        if text is None:
            break
        try:
            if not session.handle(text):
                break
        except DllamaError as e:
            if not interactive:
                raise
            note(f"error: {e}")


def chat_in_terminal(send: Callable[[List[Dict[str, str]]], Iterator[dict]],
                     system: Optional[str], greeting: str) -> None:
    """The whole chat on this process's terminal: answers to stdout as they stream, notes
    to stderr, readline history when stdin is a terminal (else one message per line of
    stdin, errors end the command). Shared by the chat through the service and the chat
    with a local model; `send` is what differs."""
    import sys

    import click

    def write(text: str) -> None:
        click.echo(text, nl=False)
        sys.stdout.flush()

    def note(text: str) -> None:
        click.echo(text, err=True)

    interactive = sys.stdin.isatty()
    save_history = setup_history() if interactive else None
    if interactive:
        def read_line(prompt: str) -> str:
            try:
                return input(prompt)
            except EOFError:
                write("\n")          # Ctrl-D: the shell's prompt then starts on its own line
                raise
        note(f"{greeting} /help lists the commands; Ctrl-C stops an answer, Ctrl-D leaves.")
    else:
        def read_line(prompt: str) -> str:
            line = sys.stdin.readline()
            if line == "":
                raise EOFError
            return line.rstrip("\n")
    try:
        run_chat(ChatSession(send, write, note, system), read_line, note,
                 interactive=interactive)
    finally:
        if save_history is not None:
            save_history()
