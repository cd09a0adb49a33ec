import os
import sys

# Tests never touch the hub: a failed lookup costs ~50 s here (see MACHINE.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# decode eagerly unless a test asks for the compiled step (tests/test_decode.py): compiling costs every process
# tens of seconds here, and the compiled step is tested against the eager one
os.environ.setdefault("SKILL_SD_COMPILE", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
