"""``python -m probes``: the ``probes`` command (as the ``probes`` script)."""

from cli import probes

if __name__ == "__main__":
    probes(prog_name="probes")
