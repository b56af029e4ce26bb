"""The data plane: gunicorn-managed uvloop/aiohttp workers that authenticate, admit, forward."""
