"""``python -m featcache ...`` runs the ``featcache`` command (also ``torchrun -m featcache extract ...``)."""

from cli import featcache

if __name__ == "__main__":
    featcache(prog_name="featcache")
