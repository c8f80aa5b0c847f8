"""The tests start the real app through the measurement layer's helper (allinone_gguf/measure/app_process.py)."""
from allinone_gguf.measure.app_process import READY, AppServer, free_port, running_app  # noqa: F401
from allinone_gguf.paths import ROOT  # noqa: F401
