"""Publish distilled students to the Hugging Face Hub, and load published ones.

A pushed repository holds exactly what a run's student folder holds (``model.safetensors`` + ``config.json`` in
timm's format, ``distillation.json``) plus a model card rendered from ``hub_cards/`` with huggingface_hub's
``ModelCard``. Anyone loads it with plain timm: ``timm.create_model('hf-hub:ORG/NAME', pretrained=True)``.

timm's own ``push_to_hf_hub`` is not used: it re-saves the weights from a live model object and writes a README only
when the repository has none, so a second push could never update the card. This module uploads the finished
folder instead (``HfApi.upload_folder``), which also lets finished offline runs be pushed later.
"""
import json
import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import timm
import torch.nn as nn
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, validate_repo_id

from ..base import UserError, __version__, first_line
from .export import DISTILLATION_JSON, public_record, read_record

_logger = logging.getLogger(__name__)

HUB_CHECK_TIMEOUT = 10.0  # seconds for the up-front round trip of --push-to-hub

CARD_NAME = 'model_card.md'
STUDENT_FILES = ('model.safetensors', 'config.json', DISTILLATION_JSON)
SEARCH_TAG = 'timm_icd'  # every push carries it: `python -m timm_icd hub search` lists the models with it
TAGS = ['image-classification', 'timm', 'knowledge-distillation', 'icd', SEARCH_TAG]
LOCAL_DATASETS = ('digits', 'imagefolder:', '/', '.', '~')
# a collection's slug as in its URL: NAMESPACE/TITLE-ID, the ID being the Hub's 24 hex digits
COLLECTION_SLUG = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+-[0-9a-f]{24}')


def method_tag(method: str) -> str:
    """The tag a push carries for its method (``method:icd+kd``), which search filters on."""
    return f'method:{method}'


def check_push_target(repo_id: str, round_trip: bool = False) -> str:
    """Fail before any training when the repo id is malformed or no token is available; return the token.

    With ``round_trip``, also ask the Hub who the token belongs to (``hub_whoami``): one request, and refuse when
    the Hub cannot be reached, rejects the token or answers something that is not the Hub's answer.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"bad Hub repo id '{repo_id}': {first_line(e)} Use ORG/NAME.") from e
    if '/' not in repo_id:
        raise UserError(f"bad Hub repo id '{repo_id}': use ORG/NAME (the user or organisation to push to).")
    token = get_token()
    if not token:
        raise UserError('no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again.')
    if round_trip:
        endpoint = constants.ENDPOINT
        try:
            hub_whoami(token)
        except Exception as e:  # httpx's, huggingface_hub's and JSON's errors alike: the Hub is not usable now
            raise UserError(f'--push-to-hub {repo_id}: {describe_error(e, endpoint)}; checked before training, so '
                            f'nothing ran. Fix it, or train without --push-to-hub and push later with '
                            f'`python -m timm_icd push`.') from e
    return token


def hub_whoami(token: str, timeout: float = HUB_CHECK_TIMEOUT) -> dict:
    """``HfApi.whoami`` with a timeout: one GET of ``/api/whoami-v2``, no retries; the account's record.

    ``HfApi.whoami`` takes no timeout and huggingface_hub's shared client has none, so a Hub that accepts the
    connection and never answers would hold the run forever: the same request is sent here with one.
    """
    response = get_session().get(f'{constants.ENDPOINT}/api/whoami-v2', headers=build_hf_headers(token=token),
                                 timeout=timeout)
    hf_raise_for_status(response)
    try:
        record = response.json()
    except ValueError as e:
        raise ValueError(f'not the Hub\'s answer: {response.text[:60]!r}') from e
    if not isinstance(record, dict) or not isinstance(record.get('name'), str):
        raise ValueError(f'not the Hub\'s answer: {response.text[:60]!r}')
    return record


def check_collection_slug(slug: str) -> str:
    """Fail before any training or upload when ``slug`` cannot be a Hub collection's slug; return it."""
    if not COLLECTION_SLUG.fullmatch(slug):
        raise UserError(f"bad Hub collection slug '{slug}': use the slug from the collection's URL, "
                        f"NAMESPACE/TITLE-ID (e.g. my-org/students-0123456789abcdef01234567).")
    return slug


def card_template() -> Path:
    """hub_cards/model_card.md: beside the package in a checkout, or under share/timm_icd when pip-installed."""
    for root in (Path(__file__).resolve().parents[2], Path(sys.prefix) / 'share' / 'timm_icd'):
        if (root / 'hub_cards' / CARD_NAME).is_file():
            return root / 'hub_cards' / CARD_NAME
    raise UserError(f'model card template hub_cards/{CARD_NAME} not found; reinstall timm_icd.')


def _hub_dataset_id(name: str) -> Optional[str]:
    """The dataset's Hub id, or None for local and built-in data."""
    return None if name.startswith(LOCAL_DATASETS) or name.count('/') > 1 else name


def _public_dataset_name(name: str) -> str:
    """A Hub id as is; a local folder by its last path part only, so no local path is published."""
    if _hub_dataset_id(name):
        return name
    return Path(name.split(':', 1)[-1]).name or name


def teacher_tag(record: dict) -> Optional[str]:
    """``teacher:ID`` for the card's tags: the teacher's Hub id, else its architecture. The Hub's model tree has no
    "distilled from" relation, so the teacher is a tag and in distillation.json, not the card's ``base_model``."""
    teacher = record.get('teacher') or {}
    name = teacher.get('hf_hub_id') or teacher.get('architecture')
    return f'teacher:{name}' if name else None


def render_card(record: dict, config: dict, repo_id: str, license: str = 'apache-2.0',
                baseline: Optional[dict] = None) -> ModelCard:
    """The model card for a student folder; every number in it comes from ``record`` (its distillation.json).

    Args:
        record: The run's distillation.json (its ``method_title``, the method in words, comes from the table of loss
            terms; a record from before it names the method by its id).
        config: The folder's timm config.json.
        repo_id: Where it is published.
        license: SPDX id for the card's license field.
        baseline: distillation.json of the same student trained vanilla, for the results table.
    """
    dataset = record['dataset']
    dataset_id = _hub_dataset_id(dataset['name'])
    public_name = _public_dataset_name(dataset['name'])
    eval_results = []
    for metric, name in (('top1', 'top-1 accuracy'), ('top5', 'top-5 accuracy')):
        if record.get(metric) is not None:
            eval_results.append(EvalResult(
                task_type='image-classification', dataset_type=dataset_id or public_name,
                dataset_name=public_name, dataset_split=dataset['eval_split'], metric_type='accuracy',
                metric_name=name, metric_value=round(record[metric], 4)))
    card_data = ModelCardData(
        model_name=repo_id.split('/')[-1], library_name='timm', license=license,
        tags=[*TAGS, method_tag(record['method']), *filter(None, [teacher_tag(record)])],
        pipeline_tag='image-classification', datasets=[dataset_id] if dataset_id else None,
        # the student's own starting weights: a pretrained student is a fine-tune of them
        base_model=record.get('student_hf_hub_id'), eval_results=eval_results or None)
    return ModelCard.from_template(
        card_data, template_path=str(card_template()), repo_id=repo_id, record=public_record(record), config=config,
        baseline=baseline, method_name=record.get('method_title') or record['method'],
        timm_icd_version=__version__, license=license)


def describe_error(e: Exception, endpoint: str) -> str:
    """What went wrong talking to the Hub at ``endpoint``, for a one-line error (never the token)."""
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        reason = first_line(e, 200)
        if status == 401:
            return f'the Hub at {endpoint} rejected the token (401): set a valid HF_TOKEN or run `hf auth login`'
        if status == 403:
            return f'the token may not write to this repository (403: {reason})'
        return f'the Hub at {endpoint} answered {status}: {reason}'
    if isinstance(e, ValueError):  # hub_whoami: something answered, but not as the Hub does
        return f'the server at {endpoint} answered {first_line(e, 120)}, not as the Hub does'
    return f'cannot reach the Hub at {endpoint} ({type(e).__name__}: {first_line(e, 200)})'


def push_student(folder, repo_id: str, private: bool = False, revision: Optional[str] = None,
                 license: str = 'apache-2.0', baseline=None, commit_message: Optional[str] = None,
                 collection: Optional[str] = None) -> str:
    """Push a student folder to ``repo_id`` (created if needed; a second push updates it). Returns the commit URL.

    The token comes from HF_TOKEN or the huggingface_hub login and is never printed or written. On any failure the
    local folder is left exactly as it was, and the error says how to retry. With ``collection`` (a collection's
    slug), the repository is then added to that collection (nothing happens when it is in it already).
    """
    folder = Path(folder)
    missing = [name for name in STUDENT_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f'{folder} is not a finished student folder (missing {", ".join(missing)}).')
    if collection:
        check_collection_slug(collection)
    token = check_push_target(repo_id)
    record = read_record(folder)
    config = json.loads((folder / 'config.json').read_text())
    baseline_record = read_record(Path(baseline)) if baseline else None
    card = render_card(record, config, repo_id, license=license, baseline=baseline_record)
    endpoint = constants.ENDPOINT
    api = HfApi(token=token, library_name='timm_icd', library_version=__version__)
    with tempfile.TemporaryDirectory(prefix='timm_icd_push_') as staging:
        for name in STUDENT_FILES:  # stage copies: the run folder itself is never written to
            shutil.copy2(folder / name, Path(staging) / name)
        if record:  # published without local paths
            (Path(staging) / DISTILLATION_JSON).write_text(json.dumps(public_record(record), indent=2))
        card.save(str(Path(staging) / 'README.md'))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=staging, revision=revision,
                commit_message=commit_message or f"Distilled {record['student']} ({record['method']})")
        except Exception as e:
            retry = f'python -m timm_icd push {folder} {repo_id}'
            raise UserError(f'push to {repo_id} failed: {describe_error(e, endpoint)}. The run folder is '
                            f'unchanged; retry with `{retry}`.') from e
    _logger.info(f'Pushed {folder} to {commit.commit_url}')
    if collection:
        add_to_collection(api, repo_id, collection)
    return commit.commit_url


def add_to_collection(api: HfApi, repo_id: str, slug: str) -> None:
    """Add the model repository ``repo_id`` to the collection ``slug`` (already there: nothing to do)."""
    try:
        api.add_collection_item(slug, item_id=repo_id, item_type='model', exists_ok=True)
    except Exception as e:
        raise UserError(f'pushed {repo_id}, but adding it to collection {slug} failed: '
                        f'{describe_error(e, api.endpoint)}; add it on the Hub, or push again.') from e
    _logger.info(f'Added {repo_id} to collection {slug}')


def load_student(name: str, **kwargs) -> nn.Module:
    """A published (``hf-hub:ORG/NAME``) or local (folder or ``local-dir:PATH``) student, ready to use.

    The model carries its pretrained_cfg, so ``timm.data.resolve_data_config(model=model)`` gives its transform.
    """
    if not name.startswith(('hf-hub:', 'local-dir:')):
        if not Path(name).is_dir():
            raise UserError(f"'{name}' is neither hf-hub:ORG/NAME, local-dir:PATH nor a student folder.")
        name = f'local-dir:{name}'
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:
        raise UserError(f"cannot load student '{name}': {first_line(e)}") from e
