"""What ``test_harness.py`` runs through ``helpers.run_cli`` to compare a forked command with a fresh interpreter:
``zygote_probe.py MODE`` prints what a process is given, then ends the way MODE says."""
import atexit
import os
import random
import sys
import threading
import time

import numpy as np

mode = sys.argv[1]
print(f'argv {sys.argv[1:]} cwd {os.getcwd()} path0 {sys.path[0]} name {__name__}')
print(f'draws {random.random()} {np.random.random()}')
print(f'pid {os.getpid()} ppid {os.getppid()}', flush=True)
atexit.register(print, 'atexit handler ran')
threading.Thread(target=lambda: (time.sleep(0.5), print('thread finished', flush=True))).start()
print('to stderr', file=sys.stderr)
if mode == 'exit-code':
    sys.exit(3)
elif mode == 'exit-text':
    sys.exit('a message instead of a code')
elif mode == 'raise':
    raise ValueError('the probe fails')
elif mode == 'hang':
    time.sleep(600)
