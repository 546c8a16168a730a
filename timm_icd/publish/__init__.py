from .export import DISTILLATION_JSON, public_name, public_record, read_record, save_student
from .hub import check_push_target, load_student, push_student, render_card
from .report import CURVES, plot_run, plot_runs, read_run, table
