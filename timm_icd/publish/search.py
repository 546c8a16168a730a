"""Find the students published with this tool on the Hub: what each is, what it measured, how much it is used.

Every push carries the tag ``timm_icd`` and one naming its method (``method:icd+kd``, see ``hub.py``). A search lists
the models with the tag through ``HfApi.list_models``, where the Hub itself filters the method, the author and a Hub
dataset (``dataset:ORG/NAME``, from the card's ``datasets``), and sorts by downloads or recency. Each listed model's
card metadata comes with the listing (its model-index holds the measured top-1 / top-5); its ``distillation.json``
(one small download) says the architecture, teacher, dataset and parameter count. What the listing cannot filter
(architecture, teacher, a local dataset's name) is filtered on those records, and ``--sort accuracy`` sorts them.
"""
import fnmatch
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterable, List, Optional, Sequence, Union

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from huggingface_hub.utils import get_session

from ..base import UserError, __version__, first_line
from .export import DISTILLATION_JSON, public_name
from .hub import SEARCH_TAG, describe_error, method_tag

_logger = logging.getLogger(__name__)

SORTS = {'accuracy': None, 'downloads': 'downloads', 'recent': 'last_modified'}  # ours -> list_models' sort
LISTING_LIMIT = 1000  # models read per search at most (each costs one small download)
READERS = 8  # distillation.json downloads in flight at once
EXPAND = ['author', 'cardData', 'downloads', 'lastModified', 'library_name', 'tags']
PROBE_TIMEOUT = 10.0  # seconds
METRIC_NAMES = {'top1': 'top-1 accuracy', 'top5': 'top-5 accuracy'}  # as render_card names them


@dataclass(frozen=True)
class PublishedStudent:
    """One student on the Hub, as its card metadata, its distillation.json and the listing describe it."""
    repo_id: str
    architecture: Optional[str]
    teacher: Optional[str]  # as published: a timm name, hf-hub:ORG/NAME, or local-dir:FOLDER
    teacher_architecture: Optional[str]
    dataset: Optional[str]
    split: Optional[str]
    method: str
    top1: Optional[float]
    top5: Optional[float]
    parameters: Optional[int]
    downloads: Optional[int]
    last_modified: Optional[str]  # ISO 8601, UTC

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    """The students found, best first, and one note per listed model that could not be read."""
    students: List[PublishedStudent] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)


def card_claims(card_data) -> dict:
    """The top-1 / top-5 (%) a model card's model-index claims (``{}`` without one), as ``render_card`` writes them."""
    claims = {}
    for result in getattr(card_data, 'eval_results', None) or []:
        for key, name in METRIC_NAMES.items():
            if result.metric_name == name and isinstance(result.metric_value, (int, float)):
                claims.setdefault(key, float(result.metric_value))
    return claims


def check_reachable(endpoint: str) -> None:
    """One request without retries, so a machine without network fails in a second, not after the client's
    retries with backoff (about 20 seconds for a listing)."""
    if constants.is_offline_mode():
        raise UserError(f'cannot reach the Hub at {endpoint}: offline mode is on (HF_HUB_OFFLINE); unset it to '
                        f'search.')
    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT)
    except Exception as e:  # any transport failure (refused, dropped, DNS, TLS): no answer at all
        raise UserError(f'cannot reach the Hub at {endpoint} ({type(e).__name__}: {first_line(e, 200)}).') from e


def _matches(pattern: Optional[str], values: Iterable[Optional[str]]) -> bool:
    """No pattern, or one of ``values`` matches it (case-insensitive; shell-style wildcards allowed)."""
    if not pattern:
        return True
    return any(v and fnmatch.fnmatchcase(v.lower(), pattern.lower()) for v in values)


def matches(student: PublishedStudent, architecture: Optional[str] = None, teacher: Optional[str] = None,
            dataset: Optional[str] = None, author: Optional[str] = None, method: Optional[str] = None) -> bool:
    """Whether ``student`` passes every given filter.

    Args:
        architecture: The student's timm architecture.
        teacher: The teacher's architecture, timm name or Hub id (with or without ``hf-hub:``).
        dataset: The dataset's name as published (a Hub id, or a local folder's last part; a path is shortened).
        author: The user or organisation owning the repository.
        method: The method (``icd+kd``, ``kd``, ...).
    """
    teacher_names = [student.teacher_architecture, student.teacher]
    if student.teacher and student.teacher.startswith('hf-hub:'):
        teacher_names.append(student.teacher[len('hf-hub:'):])
    return (_matches(architecture, [student.architecture])
            and _matches(teacher, teacher_names)
            and _matches(public_name(dataset) if dataset else None, [student.dataset])
            and _matches(author, [student.repo_id.split('/')[0]])
            and (not method or student.method == method))


def sort_students(students: Sequence[PublishedStudent], sort: str = 'accuracy') -> List[PublishedStudent]:
    """Best first: highest top-1, most downloads, or most recently updated; unknown values last, ties by repo id."""
    key = {'accuracy': 'top1', 'downloads': 'downloads', 'recent': 'last_modified'}[sort]
    by_id = sorted(students, key=lambda s: s.repo_id)
    known = sorted([s for s in by_id if getattr(s, key) is not None], key=lambda s: getattr(s, key), reverse=True)
    return known + [s for s in by_id if getattr(s, key) is None]


def read_student(info, record: dict) -> PublishedStudent:
    """A listed model (``huggingface_hub.ModelInfo``) and its distillation.json, as one record.

    The accuracy is the card's model-index (what the Hub shows), else the record's.
    """
    claims = card_claims(info.card_data)
    teacher = record.get('teacher') or {}
    dataset = record.get('dataset') or {}
    student = record.get('student') or None  # a timm name, or hf-hub:/local-dir: (then 'architecture' tells)
    if student and ':' in student:
        student = None
    return PublishedStudent(
        repo_id=info.id, architecture=record.get('architecture') or student,
        teacher=teacher.get('name'), teacher_architecture=teacher.get('architecture'),
        dataset=dataset.get('name'), split=dataset.get('eval_split'), method=record['method'],
        top1=claims.get('top1', record.get('top1')), top5=claims.get('top5', record.get('top5')),
        parameters=record.get('parameters'), downloads=info.downloads,
        last_modified=info.last_modified.isoformat() if info.last_modified else None)


def _read_record(api: HfApi, repo_id: str) -> dict:
    """A listed model's distillation.json; ``LookupError`` with the reason when it has none that can be read."""
    try:
        path = api.hf_hub_download(repo_id, DISTILLATION_JSON)
    except LocalEntryNotFoundError as e:  # the client could not reach the Hub and has no cached copy
        raise UserError(f'cannot reach the Hub at {api.endpoint} while reading {repo_id} '
                        f'({first_line(e, 200)}).') from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        raise LookupError(f'no {DISTILLATION_JSON}' if status == 404 else describe_error(e, api.endpoint)) from e
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise LookupError(f'unreadable {DISTILLATION_JSON} ({first_line(e, 200)})') from e
    if not isinstance(record, dict) or not isinstance(record.get('method'), str):
        raise LookupError(f'{DISTILLATION_JSON} names no method')
    return record


def search_students(architecture: Optional[str] = None, teacher: Optional[str] = None,
                    dataset: Optional[str] = None, author: Optional[str] = None, method: Optional[str] = None,
                    sort: str = 'accuracy', limit: int = 20, token=None) -> SearchResult:
    """The students pushed with this tool that pass every given filter, best first (see ``matches``).

    Args:
        architecture, teacher, dataset, author, method: Filters, as ``matches`` takes them.
        sort: ``accuracy`` (top-1), ``downloads`` or ``recent``.
        limit: Students returned at most.
        token: Passed to ``HfApi`` (default: HF_TOKEN or the login; private repositories of its owner are listed).
    """
    if method is not None and not re.fullmatch(r'[a-z][a-z0-9_+]*', method):  # the table's names (distill/terms.py)
        raise UserError(f"unknown method '{method}': a method name such as icd+kd.")
    if sort not in SORTS:
        raise UserError(f"unknown sort '{sort}': one of {', '.join(SORTS)}.")
    if limit < 1:
        raise UserError(f'--limit must be >= 1, got {limit}.')
    api = HfApi(token=token, library_name='timm_icd', library_version=__version__)
    check_reachable(api.endpoint)
    hub_dataset = dataset if dataset and dataset.count('/') == 1 and not dataset.startswith(('/', '.', '~')) \
        else None  # ORG/NAME: the Hub's dataset:ORG/NAME tag (a local folder's name is matched on the records)
    try:
        listed = list(api.list_models(
            filter=[SEARCH_TAG] + ([method_tag(method)] if method else []), author=author or None,
            trained_dataset=hub_dataset, sort=SORTS[sort], limit=LISTING_LIMIT, expand=EXPAND))
    except HfHubHTTPError as e:
        raise UserError(f'cannot list models: {describe_error(e, api.endpoint)}.') from e
    except ValueError as e:  # an answer that is not JSON: not a Hub (HF_ENDPOINT pointing elsewhere?)
        raise UserError(f'cannot list models: {api.endpoint} did not answer as the Hub does '
                        f'({first_line(e, 200)}); check HF_ENDPOINT.') from e

    def read(info) -> Union[PublishedStudent, str]:
        try:
            return read_student(info, _read_record(api, info.id))
        except LookupError as e:
            return f'skipped {info.id}: {e}'

    with ThreadPoolExecutor(max_workers=READERS) as pool:
        read_all = list(pool.map(read, listed))
    students = [r for r in read_all if isinstance(r, PublishedStudent)]
    found = [s for s in students if matches(s, architecture, teacher, dataset, author, method)]
    return SearchResult(students=sort_students(found, sort)[:limit],
                        skipped=[r for r in read_all if isinstance(r, str)])


def format_count(n: Optional[int]) -> str:
    """A parameter count as a short number: 3.51M, 42.1K."""
    if n is None:
        return '-'
    return f'{n / 1e6:.2f}M' if n >= 100_000 else f'{n / 1e3:.1f}K'


def _teacher_label(student: PublishedStudent) -> str:
    """A Hub teacher by its id (it can be fetched), any other by its architecture."""
    name = student.teacher or ''
    if name.startswith('hf-hub:'):
        return name[len('hf-hub:'):]
    return student.teacher_architecture or name or '-'


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = [headers, *rows]
    return '\n'.join('  '.join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def format_students(students: Sequence[PublishedStudent]) -> str:
    """The terminal table of a search."""
    headers = ['model', 'architecture', 'teacher', 'dataset', 'method', 'top-1', 'params', 'downloads']
    rows = [[s.repo_id, s.architecture or '-', _teacher_label(s), s.dataset or '-', s.method,
             '-' if s.top1 is None else f'{s.top1:.2f}', format_count(s.parameters),
             '-' if s.downloads is None else str(s.downloads)] for s in students]
    return text_table(headers, rows)
