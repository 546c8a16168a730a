from .common import is_main_process, run_command
