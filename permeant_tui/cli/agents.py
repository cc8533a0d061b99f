"""`permeant agents`: list a workspace's agents; `agents add|rename|remove` change the roster
through the engine's API (engine/api.py: add_agent, rename_agent, remove_agent) without
loading the model. Removing archives the agent's folder (transcript and snapshot) under
`<workspace>/archive/` and asks first: `--yes`, or a y on a terminal."""

from __future__ import annotations

import argparse
import json
import sys

from ..engine.text import printable
from .common import UsageError, add_verbose, add_workspace, check_agent_listed, engine_for

TEAM = ("technical", "business", "coordinator")  # the agents "ask the team" uses by name


def register(subparsers) -> None:
    p = subparsers.add_parser("agents", help="list, add, rename or remove agents")
    add_workspace(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--archived", action="store_true",
                   help="list archived conversations instead: removed agents (archive/) and "
                        "reset transcripts (agents/NAME/transcript.TIME.jsonl)")
    p.set_defaults(func=list_agents)
    sub = p.add_subparsers(dest="agents_cmd", metavar="ACTION")

    q = sub.add_parser("add", help="add an agent with its own role and system prompt")
    add_workspace(q)
    add_verbose(q)
    q.add_argument("name", help="1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit")
    q.add_argument("--role", required=True, help="a short role, e.g. 'security'")
    q.add_argument("--system", required=True, help="the agent's system prompt")
    q.add_argument("--title", help="the pane title (default: the name, capitalised)")
    q.set_defaults(func=add)

    q = sub.add_parser("rename", help="rename an agent (its KV snapshot stays valid)")
    add_workspace(q)
    add_verbose(q)
    q.add_argument("old")
    q.add_argument("new")
    q.set_defaults(func=rename)

    q = sub.add_parser("remove", help="remove an agent; its transcript and snapshot are "
                                      "archived under <workspace>/archive/")
    add_workspace(q)
    add_verbose(q)
    q.add_argument("name")
    q.add_argument("-y", "--yes", action="store_true", help="do not ask")
    q.set_defaults(func=remove)


def list_agents(args: argparse.Namespace) -> int:
    """Reads the workspace only (no lock, like `status`)."""
    from ..engine.workspace import Workspace
    from ..paths import resolve_workspace

    ws = Workspace.open(resolve_workspace(args.workspace))
    if args.archived:
        return list_archived(ws.folder, args.json)
    rows = [{"id": a.agent_id, "role": a.role, "title": a.title, "turns": len(a.turns),
             "system": a.system} for a in ws.agents.values()]
    if args.json:
        print(json.dumps({"workspace": str(ws.folder), "agents": rows}, indent=2,
                         ensure_ascii=False))
        return 0
    print(f"{'agent':<16}{'role':<14}{'turns':>6}  system prompt")
    for r in rows:
        system = printable(r["system"])
        system = system if len(system) <= 60 else system[:57] + "..."
        print(f"{printable(r['id']):<16}{printable(r['role']):<14}{r['turns']:>6}  {system}")
    return 0


def archived(folder) -> list[dict]:
    """Removed agents (archive/NAME-TIME/) and reset conversations (agents/NAME/
    transcript.TIME.jsonl), oldest first within each kind; turns counted by lines."""
    def turns(path) -> int:
        try:
            with open(path, "rb") as f:
                return sum(1 for line in f if line.strip())
        except OSError:
            return 0

    rows = []
    for d in sorted((folder / "archive").glob("*")) if (folder / "archive").is_dir() else []:
        if d.is_dir():
            try:  # the spec written at removal names the agent; else the folder's name
                name = str(json.loads((d / "agent.json").read_text(encoding="utf-8"))["id"])
            except (OSError, ValueError, KeyError, TypeError):
                name = d.name
            rows.append({"kind": "removed", "agent": name, "path": str(d),
                         "turns": turns(d / "transcript.jsonl")})
    for t in sorted((folder / "agents").glob("*/transcript.*.jsonl")):
        rows.append({"kind": "reset", "agent": t.parent.name, "path": str(t),
                     "turns": turns(t)})
    return rows


def list_archived(folder, as_json: bool) -> int:
    rows = archived(folder)
    if as_json:
        print(json.dumps({"workspace": str(folder), "archived": rows}, indent=2))
        return 0
    if not rows:
        print("nothing archived")
        return 0
    print(f"{'kind':<9}{'agent':<16}{'turns':>6}  path")
    for r in rows:
        print(f"{r['kind']:<9}{printable(r['agent']):<16}{r['turns']:>6}  {printable(r['path'])}")
    return 0


def add(args: argparse.Namespace) -> int:
    from ..engine.names import check_agent_name

    check_agent_name(args.name)  # before the workspace is opened
    engine = engine_for(args)
    try:
        view = engine.add_agent(args.name, args.role, args.system, args.title).result()
    finally:
        engine.shutdown()
    print(f"added agent '{view.agent_id}' ({printable(view.role)}) to {engine.folder}")
    return 0


def rename(args: argparse.Namespace) -> int:
    from ..engine.names import check_agent_name

    check_agent_name(args.new)
    check_agent_listed(args, args.old)
    engine = engine_for(args)
    try:
        view = engine.rename_agent(args.old, args.new).result()
    finally:
        engine.shutdown()
    print(f"renamed '{args.old}' to '{view.agent_id}'")
    _team_note(args.old, "uses the agent")
    return 0


def _team_note(name: str, verb: str) -> None:
    """A team member renamed or removed: ctrl+t looks agents up by these names."""
    if name in TEAM:
        print(f"note: asking the team (ctrl+t) {verb} named '{name}'", file=sys.stderr)


def _confirmed(question: str) -> bool:
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    print(question + " [y/N] ", end="", file=sys.stderr, flush=True)
    try:
        return sys.stdin.readline().strip().lower() in ("y", "yes")
    except (OSError, ValueError):
        return False


def remove(args: argparse.Namespace) -> int:
    check_agent_listed(args, args.name)
    engine = engine_for(args)
    try:
        view = engine.agent(args.name)  # UnknownAgent (exit 2) before asking anything
        what = (f"remove agent '{args.name}' ({len(view.turns)} turns; its transcript and "
                f"snapshot are archived under {engine.folder / 'archive'})")
        if not args.yes and not _confirmed(what[0].upper() + what[1:] + "?"):
            raise UsageError(f"{what}: not done; add --yes to confirm")
        archive = engine.remove_agent(args.name).result()
    finally:
        engine.shutdown()
    print(f"removed agent '{args.name}'; archived in {archive}")
    _team_note(args.name, "needs an agent")
    return 0
