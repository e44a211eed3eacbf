"""Leaderboard reports: tables from the results database, Markdown/CSV/JSON, plots, static HTML."""
