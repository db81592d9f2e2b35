"""`dllama-ctl key`: the cluster key file that every node of one cluster shares.

The key is KEY_BYTES random bytes kept as hex in a file of mode 0600 (cluster/auth.py
reads and writes it). The package's postinst runs `dllama-ctl key generate --if-missing`;
to join a board to an existing cluster, copy the key from a board already in it:

    dllama-ctl key show | ssh pi2 sudo dllama-ctl key set -

`key id` prints a fingerprint that two boards with the same key share, so keys can be
compared without showing them. Errors never contain the key.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional, Tuple

import click

from dllama_node.cluster import auth
from dllama_node.common.errors import UsageError

log = logging.getLogger(__name__)

RESTART_HINT = "restart the service so it uses the new key: systemctl restart dllama-node"
HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def parse_key_text(text: str, source: str = "key") -> bytes:
    """The key written as 2*KEY_BYTES hex digits (surrounding whitespace ignored).

    Raises UsageError naming the length found or the first character that is not a hex
    digit, never the text itself."""
    text = text.strip()
    expected = 2 * auth.KEY_BYTES
    if len(text) != expected:
        raise UsageError(f"{source}: expected {expected} hex digits ({auth.KEY_BYTES} bytes), "
                         f"found {len(text)} characters")
    for i, c in enumerate(text):
        if c not in HEX_DIGITS:
            raise UsageError(f"{source}: character {i + 1} of {len(text)} is not a hex digit "
                             "(0-9, a-f)")
    return bytes.fromhex(text)


def _write(path: str, key: bytes) -> None:
    """write_key, creating the folder (0755) when missing and keeping the owner and group
    of a file it replaces (the service may run as its own user)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        try:
            os.makedirs(folder, mode=0o755, exist_ok=True)
        except OSError as e:
            raise auth.ClusterKeyError(f"cannot create the folder {folder} for the cluster key "
                                       f"file: {e.strerror or e}") from None
    try:
        old = os.stat(path)
    except OSError:
        old = None
    auth.write_key(path, key)
    if old is not None and os.geteuid() == 0:
        try:
            os.chown(path, old.st_uid, old.st_gid)
        except OSError as e:
            log.warning("could not give %s back to uid %d gid %d: %s", path, old.st_uid,
                        old.st_gid, e.strerror)


def generate_key_file(path: str, if_missing: bool = False,
                      force: bool = False) -> Tuple[str, Optional[str]]:
    """Write a new random key to `path`.

    Returns ("written" | "replaced", key id), or ("kept", None) when `if_missing` and a
    file is already there. Raises UsageError (exit 2) when a file is there and neither
    `if_missing` nor `force` is given."""
    exists = os.path.lexists(path)
    if exists and if_missing:
        return "kept", None
    if exists and not force:
        raise UsageError(f"cluster key file {path} already exists: not overwriting it (every "
                         "node of the cluster must hold the same key); use --force to replace "
                         "it, or `dllama-ctl key set` to copy another node's key")
    key = auth.generate_key()
    _write(path, key)
    return ("replaced" if exists else "written"), auth.key_id(key)


def set_key_file(path: str, text: str, source: str = "key") -> str:
    """Validate `text` as a key and write it to `path`; returns its key id."""
    key = parse_key_text(text, source)
    _write(path, key)
    return auth.key_id(key)


# ---- the commands -----------------------------------------------------------------------
def _key_file_option(f):
    return click.option(
        "--key-file", metavar="PATH", default=None,
        help="The key file (default: key_file in /etc/dllama-node/dllama-node.conf, "
             f"else {auth.DEFAULT_KEY_PATH}).")(f)


def _key_path(ctx: click.Context, key_file: Optional[str]) -> str:
    if key_file:
        return key_file
    from dllama_node.ctl.settings import ctl_config
    return ctl_config((ctx.obj or {}).get("config_path")).key_file


@click.group("key")
def key_group() -> None:
    """The cluster key: a shared secret every node of one cluster holds.

    \b
    A node without the key cannot join the cluster, receive weights or send
    activations. The package makes one at install time; give every board the same one:
      dllama-ctl key id                          # compare boards: same id, same key
      dllama-ctl key show | ssh pi2 sudo dllama-ctl key set -
      sudo systemctl restart dllama-node         # on the board whose key changed
    """


@key_group.command("generate")
@_key_file_option
@click.option("--if-missing", is_flag=True,
              help="Do nothing (exit 0) when a key file is already there (for installers).")
@click.option("--force", is_flag=True, help="Replace an existing key file.")
@click.pass_context
def key_generate(ctx, key_file, if_missing, force):
    """Write a new random cluster key and print its key id.

    \b
    Refuses (exit 2) to overwrite an existing key unless --force: the other nodes
    would no longer accept this one. Examples:
      sudo dllama-ctl key generate
      sudo dllama-ctl key generate --if-missing     # in a postinst
    """
    path = _key_path(ctx, key_file)
    what, kid = generate_key_file(path, if_missing=if_missing, force=force)
    if what == "kept":
        try:
            auth.read_key(path)
        except auth.ClusterKeyError as e:
            click.echo(f"dllama-ctl: warning: {e}; replace it with "
                       "`dllama-ctl key generate --force` or `dllama-ctl key set`", err=True)
        return
    click.echo(f"key id {kid}")
    click.echo(f"written to {path}")
    if what == "replaced":
        click.echo(f"copy it to every other node (dllama-ctl key show | ssh NODE sudo "
                   f"dllama-ctl key set -), then {RESTART_HINT}", err=True)


@key_group.command("set")
@_key_file_option
@click.argument("hex_key", metavar="[HEX | -]", required=False, default="-")
@click.pass_context
def key_set(ctx, key_file, hex_key):
    """Set the cluster key from HEX, or from standard input with - (the default).

    \b
    The key is 64 hex digits, as `dllama-ctl key show` prints it on another node:
      dllama-ctl key show | ssh pi2 sudo dllama-ctl key set -
      sudo dllama-ctl key set          # on a terminal: asks, without echoing
    Prefer standard input: an argument shows up in the shell history and in ps.
    """
    path = _key_path(ctx, key_file)
    if hex_key == "-":
        if sys.stdin is not None and sys.stdin.isatty():
            text = click.prompt("cluster key (64 hex digits)", hide_input=True, err=True)
        else:
            text = sys.stdin.read()
        source = "key from standard input"
    else:
        text, source = hex_key, "key argument"
    kid = set_key_file(path, text, source)
    click.echo(f"key id {kid}")
    click.echo(f"written to {path}")
    click.echo(RESTART_HINT, err=True)


@key_group.command("id")
@_key_file_option
@click.pass_context
def key_id_command(ctx, key_file):
    """Print the key id: a fingerprint that does not reveal the key.

    Two nodes with the same key id hold the same key.
    """
    click.echo(auth.key_id(auth.read_key(_key_path(ctx, key_file))))


@key_group.command("show")
@_key_file_option
@click.pass_context
def key_show(ctx, key_file):
    """Print the key (64 hex digits) to copy it to another node. It is a secret.

    \b
      dllama-ctl key show | ssh pi2 sudo dllama-ctl key set -
    """
    key = auth.read_key(_key_path(ctx, key_file))
    click.echo("dllama-ctl: this is the cluster's secret: whoever has it can join the "
               "cluster; do not paste it anywhere public", err=True)
    click.echo(key.hex())
