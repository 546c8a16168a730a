from .errors import UserError, error_line, first_line
from .files import atomic_path, replace_dir, unique_tmp, write_text_atomic
from .version import __version__
