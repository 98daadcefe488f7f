"""Put the tests directory on sys.path so tests can import shared helpers (e.g. env_conformance)."""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
