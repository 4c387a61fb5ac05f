"""``python -m sa2va_hooks.core.host_main FD``: the export's host process (:mod:`.host_process`).
A module of its own, so that ``-m`` does not run a module the package has already imported."""
import sys

from .host_process import serve

if __name__ == "__main__":
    serve(int(sys.argv[1]))
