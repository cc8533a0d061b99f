"""`permeant tokenize`, `permeant chat` and `permeant status`: one turn, token ids, the
workspace at a glance, for scripts and tests.

`chat` streams the reply to stdout as it is generated (the engine's Tokens events, written and
flushed batch by batch); `--json` prints one object at the end instead. Arguments and the agent
are checked before the model loads. ctrl+c during a reply cancels the turn, leaves what was
printed on the screen, saves the workspace and exits 130 with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import UsageError, add_common, check_agent_listed, open_session

EXIT_INTERRUPTED = 130


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenize", help="print token ids (special tokens parsed, no BOS)")
    add_common(p, workspace=False)
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("text")
    p.set_defaults(func=tokenize)

    p = subparsers.add_parser("chat", help="run one turn of an agent, streaming the reply")
    add_common(p)
    p.add_argument("agent")
    p.add_argument("message")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="at most this many tokens (default: the workspace's max_tokens)")
    p.add_argument("--temp", type=float, default=None,
                   help="sampling temperature; 0 is greedy (default: the engine's choice)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass in (0, 1] (default: the engine's choice)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    p.add_argument("--rebuild", action="store_true",
                   help="ignore the KV snapshot and rebuild the agent by prefill")
    p.set_defaults(func=chat)

    p = subparsers.add_parser("status", help="the workspace's model and agents")
    add_common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=status)


def tokenize(args: argparse.Namespace) -> int:
    from ..engine.models import load_model

    lm = load_model(args.model)
    ids = lm.tokenizer.encode(args.text, add_special_tokens=False)
    print(json.dumps(ids) if args.json else " ".join(map(str, ids)))
    return 0


# ---- chat ----------------------------------------------------------------------------------

def check_chat_args(args: argparse.Namespace) -> None:
    """What needs neither the workspace nor the model (exit 2, one line)."""
    def usage(msg: str) -> UsageError:
        return UsageError(f"chat: {msg}")

    if args.max_tokens is not None and args.max_tokens < 1:
        raise usage(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    if args.temp is not None and not args.temp >= 0:  # also refuses nan
        raise usage(f"--temp must be 0 or more (got {args.temp})")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise usage(f"--top-p must be in (0, 1] (got {args.top_p})")
    if not args.message.strip():
        raise usage("the message is empty")


def turn_params(args: argparse.Namespace, default_max_tokens: int):
    """An explicit TurnParams when a sampling flag is given; None lets the engine decide
    (its defaults, the agent's settings)."""
    from ..engine.generation import TurnParams

    given = {k: v for k, v in (("temp", args.temp), ("top_p", args.top_p), ("seed", args.seed))
             if v is not None}
    if not given:
        return None
    return TurnParams(max_tokens=args.max_tokens or default_max_tokens, **given)


class ReplyStream:
    """Writes one turn's text to stdout as its Tokens events arrive, flushing each batch."""

    def __init__(self, agent_id: str, out=None):
        self.out = out or sys.stdout
        self.turn_id: int | None = None  # set once the turn is queued
        self.agent_id = agent_id
        self.parts: list[str] = []
        self.ids = 0

    def __call__(self, ev) -> None:
        from ..engine.events import Tokens

        if isinstance(ev, Tokens) and ev.turn_id == self.turn_id and ev.agent_id == self.agent_id:
            self.parts.append(ev.text)
            self.ids += len(ev.ids)
            self.out.write(ev.text)
            self.out.flush()


def chat(args: argparse.Namespace) -> int:
    """One turn. Exit 0 once the turn is recorded, even when its KV snapshot could not be
    written (a full or read-only disk): the reply is printed and stderr says, in one line, that
    the snapshot will be rebuilt from the transcript."""
    from ..engine.errors import PermeantError, TurnCancelled

    check_chat_args(args)
    check_agent_listed(args, args.agent)
    session = open_session(args, check=lambda engine: engine.agent(args.agent),
                           rebuild=args.rebuild)
    engine, reporter = session.engine, session.reporter
    stream = ReplyStream(args.agent)
    interrupted = False
    result = None
    try:
        params = turn_params(args, engine.settings().max_tokens)
        turn_id, fut = engine.submit_future(args.agent, args.message,
                                            max_tokens=args.max_tokens, params=params)
        stream.turn_id = turn_id

        def on_event(ev) -> None:
            from ..engine.events import Tokens

            if isinstance(ev, Tokens):
                reporter.stop()  # the reply takes the terminal from the progress line
            if not args.json:
                stream(ev)

        try:
            result = session.wait(fut, on_event)
        except PermeantError:
            if stream.parts:  # the error line goes below what was printed, not after it
                sys.stdout.write("\n")
            raise
        except KeyboardInterrupt:
            interrupted = True
            engine.cancel(args.agent)
            try:
                result = session.wait(fut, on_event)
            except TurnCancelled:
                result = None
    finally:
        session.close()
    if interrupted:
        return _interrupted(args, stream, result, saved=not reporter.problems)
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        if not stream.parts:  # nothing streamed (an empty reply): keep the old output
            sys.stdout.write(result.reply)
        sys.stdout.write("\n")
    return 0


def _interrupted(args: argparse.Namespace, stream: ReplyStream, result, saved: bool) -> int:
    """ctrl+c: the printed part stays; one line says what the workspace kept (the lines above
    it, if any, say what could not be saved)."""
    if stream.parts and not args.json:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if result is not None and getattr(result, "finish_reason", "") != "cancelled":
        what = f"the reply had finished ({result.generated} tokens) and is recorded"
    elif result is not None:
        what = f"the reply was cut after {result.generated} tokens and kept"
    else:
        what = f"the reply was cancelled after {stream.ids} tokens and not recorded"
    what += ("; the workspace is saved" if saved
             else "; the transcript is intact, see above for what was not saved")
    print(f"permeant: interrupted: {args.agent}: {what}", file=sys.stderr)
    return EXIT_INTERRUPTED


# ---- status --------------------------------------------------------------------------------

def status(args: argparse.Namespace) -> int:
    from ..engine.models import chat_format_of
    from ..engine.workspace import Workspace
    from ..paths import resolve_workspace
    from .workspaces import remember

    ws = Workspace.open(resolve_workspace(args.workspace))
    remember(ws.folder)
    agents = []
    for a in ws.agents.values():
        snap, imported = ws.snapshot_path(a.agent_id), ws.imported_path(a.agent_id)
        state = ("snapshot" if snap.exists() else "imported" if imported.exists()
                 else "transcript" if a.turns else "empty")
        agents.append({
            "id": a.agent_id, "role": a.role, "turns": len(a.turns), "tokens": a.tokens_on_disk,
            # the snapshot's manifest and KV blocks, or the imported file
            "bytes": a.bytes_on_disk if snap.exists() or imported.exists() else 0,
            "state": state,
            "resident": False,  # a status process holds no caches; the TUI shows live residency
            "snapshot": str(snap) if snap.exists() else None,
            "imported": str(imported) if imported.exists() else None,
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(a.last_used))
            if a.last_used > 0 else None,
        })
    out = {"workspace": str(ws.folder), "model": ws.settings.model or "default (SmolLM2-135M-"
           "Instruct Q4_1, embedded)", "max_resident": ws.settings.max_resident,
           "memory_budget_mb": ws.settings.memory_budget_mb, "agents": agents,
           "chat_format": chat_format_of(ws.settings.model)}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"workspace {out['workspace']}\nmodel     {out['model']}")
    if out["chat_format"]:
        note = ": no chat template in the model" if "base model" in out["chat_format"] else ""
        print(f"chat      {out['chat_format']}{note}")
    print(f"{'agent':<14}{'role':<13}{'turns':>6}{'tokens':>8}{'MB':>8}  {'KV state':<11} "
          f"last used")
    for a in agents:
        print(f"{a['id']:<14}{a['role']:<13}{a['turns']:>6}{a['tokens']:>8}"
              f"{a['bytes'] / 1e6:>8.1f}  {a['state']:<11} {a['last_used'] or '-'}")
    return 0
