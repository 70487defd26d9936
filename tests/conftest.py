import sys
from pathlib import Path

# Lets tests import the shared tiny-model helpers as `tiny_models`.
sys.path.insert(0, str(Path(__file__).resolve().parent / "unit"))
