"""Screens: the workspace (three agent panes) and its modals. One screen per file, its
stylesheet beside it (workspace.tcss; the modals share dialog.tcss)."""
