from .compare import (
    CLAIM_TOLERANCE, check_claim, count_macs, count_parameters, csv_table, markdown_table, read_claims,
    write_comparison)
from .export import DISTILLATION_JSON, public_name, public_record, read_record, save_student
from .hub import (
    SEARCH_TAG, TAGS, check_collection_slug, check_push_target, load_student, method_tag, push_student,
    render_card)
from .report import CURVES, plot_run, plot_runs, read_run, table
from .search import (
    SORTS, PublishedStudent, SearchResult, card_claims, format_count, format_students, matches, search_students,
    sort_students, text_table)
