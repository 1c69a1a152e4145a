"""run.py, but it stops itself (SIGSTOP) once it has printed its first line containing its first argument (in
torchrun's first launch, not a restart): a test then acts on a run that is certainly at that line and no further,
however loaded the machine, and lets it go on (SIGCONT). `python tests/stopping_run.py TEXT RUN_PY_ARGS...`"""

import logging
import os
import signal
import sys

import run

at, real = sys.argv.pop(1), logging.StreamHandler.emit


def emit(self, record):
    global at
    real(self, record)
    if at and at in record.getMessage() and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        at = None
        os.kill(os.getpid(), signal.SIGSTOP)


logging.StreamHandler.emit = emit
sys.exit(run.main(sys.argv[1:]))
