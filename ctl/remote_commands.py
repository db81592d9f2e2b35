"""What dllama-ctl does through the local dllama-node (no --model given): generate, chat,
status, models, plan. Each function translates options into one control-socket request
(ctl/daemon_client.py) and prints the answer; the daemon does the work.
"""
from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

import click

from dllama_node.common.text_table import align_columns
from dllama_node.ctl.daemon_client import DaemonClient
from dllama_node.tokenizer.conversation_fit import LIMIT_CONTEXT, stopped_note


def generation_params(temperature: float, top_k: int, top_p: float, repetition_penalty: float,
                      seed: Optional[int], max_tokens: int, stop: Sequence[str] = ()) -> dict:
    """The sampler part of a generate request, checked here first so a bad value fails
    before anything is sent (same checks as the local engine)."""
    from dllama_node.common.errors import UsageError
    from dllama_node.ctl.local_commands import sampler_settings

    sampler_settings(temperature, top_k, top_p, repetition_penalty, seed)   # validates
    if max_tokens < 0:
        raise UsageError(f"max-tokens {max_tokens}: expected 0 or more")
    params = {"max_tokens": int(max_tokens), "temperature": float(temperature),
              "top_k": int(top_k), "top_p": float(top_p),
              "repetition_penalty": float(repetition_penalty), "seed": seed}
    if stop:
        params["stop"] = list(stop)
    return params


DEFAULT_WAIT_S = 600.0


def wait_for_cluster(client: DaemonClient, timeout_s: float,
                     daemon_may_start: bool = False) -> dict:
    """The status once the cluster serves. Until then the waiting line and a progress bar
    per node while slices load go to stderr (ctl/load_view.py). timeout_s 0 waits not at
    all: a cluster that does not serve is an error at once. Without
    daemon_may_start, a daemon that does not answer the first time is an error at once
    (`status --wait` right after `systemctl start` waits for it instead)."""
    from dllama_node.common.errors import ClusterError, DllamaError
    from dllama_node.ctl.load_view import LoadDisplay, is_serving, wait_until_serving

    display = LoadDisplay(sys.stderr)
    try:
        first = client.status()
    except DllamaError as e:
        if not daemon_may_start or timeout_s <= 0:
            raise
        display.problem(str(e))
    else:
        if is_serving(first):
            return first
        if timeout_s <= 0:
            from dllama_node.ctl.load_view import waiting_line
            raise ClusterError(f"the cluster is not serving: {waiting_line(first)} "
                               "(--wait-timeout SECONDS waits for it)")
        display.show(first)
    return wait_until_serving(client.status, timeout_s, display)


def generate(client: DaemonClient, prompt: str, chat_format: bool, params: dict,
             as_json: bool, wait_s: float = DEFAULT_WAIT_S) -> None:
    """One generation; text streams to stdout, or one JSON object with --json. A cluster
    still loading is waited for (wait_s), with its progress on stderr."""
    wait_for_cluster(client, wait_s)
    request = dict(params)
    if chat_format:
        request["messages"] = [{"role": "user", "content": prompt}]
    else:
        request["prompt"] = prompt
    final = {}
    for line in client.generate(request):
        if line.get("done"):
            final = line
            break
        if not as_json and line.get("text"):
            click.echo(line["text"], nl=False)
    if as_json:
        click.echo(json.dumps({k: v for k, v in final.items() if k != "done"}))
        return
    click.echo("")
    n_prompt, n_out = len(final.get("prompt_tokens", ())), len(final.get("tokens", ()))
    click.echo(f"[{n_prompt} prompt tokens, {n_out} generated, "
               f"{final.get('finish_reason', 'done')}]", err=True)
    if final.get("limit") == LIMIT_CONTEXT:
        click.echo(stopped_note(LIMIT_CONTEXT, final.get("max_seq_len")), err=True)


def chat(client: DaemonClient, params: dict, system: Optional[str],
         wait_s: float = DEFAULT_WAIT_S) -> None:
    """The interactive chat (ctl/chat_repl.py) with answers from the daemon, once the
    cluster serves (waited for, with progress bars, up to wait_s)."""
    from dllama_node.ctl.chat_repl import chat_in_terminal

    wait_for_cluster(client, wait_s)

    def send(messages):
        return client.generate(dict(params, messages=messages))
    chat_in_terminal(send, system, "Chat through the dllama-node cluster.")


def status(client: DaemonClient, as_json: bool, wait_s: Optional[float] = None) -> None:
    """The cluster's status; with wait_s, once it serves (progress on stderr meanwhile)."""
    from dllama_node.ctl.status_view import format_status

    answer = wait_for_cluster(client, wait_s, daemon_may_start=True) if wait_s is not None \
        else client.status()
    answer.pop("done", None)
    click.echo(json.dumps(answer) if as_json else format_status(answer))


def models(client: DaemonClient, as_json: bool) -> None:
    answer = client.models()
    items = answer.get("models", [])
    if as_json:
        click.echo(json.dumps({"models": items}))
        return
    if not items:
        click.echo("no models: give a node one with model = PATH in "
                   "/etc/dllama-node/dllama-node.conf")
        return
    rows = [("id", "held by", "identity", "path")]
    for m in items:
        rows.append((str(m.get("id", "?")), ", ".join(m.get("held_by") or ()) or "-",
                     str(m.get("identity") or "-")[:16], str(m.get("path") or "-")))
    for line in align_columns(rows):
        click.echo(line)


def plan(client: DaemonClient, model: Optional[str], max_seq_len: Optional[int],
         as_json: bool) -> None:
    answer = client.plan(model, max_seq_len or 0)
    if as_json:
        click.echo(json.dumps(answer.get("plan")))
    else:
        click.echo(answer.get("table") or json.dumps(answer.get("plan"), indent=1))
