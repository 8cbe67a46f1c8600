"""`python -m fedpsg` is the `fedpsg` command."""

from fedpsg.run.cli import app

app(prog_name="fedpsg")
