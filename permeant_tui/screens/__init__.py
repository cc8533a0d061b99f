"""Screens: the workspace (three agent panes) and its modals. One screen per file."""
