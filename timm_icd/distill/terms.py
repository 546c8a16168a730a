"""The table of loss terms: every term a run can train with, declared once, and the methods derived from it.

    loss = task_loss_weight * CE + kd_loss_weight * LOGIT + icd_loss_weight * ICD

Each ``LossTerm`` carries its loss function, a frozen parameters dataclass (one ``--NAME-FIELD`` flag and one
``NAME_FIELD`` keyword of ``ICDDistillationTask`` per field), its default weights and temperature, whether it needs
hard labels and the teacher's label space, and its citation. The methods are combinations of the table: ``vanilla``,
each logit term alone, ``icd``, ``icd+`` each logit term, and timm's own tasks (``feature``, ``token``). ``--method``'s
choices, the flag checks, distillation.json's loss record, the card's method line and the README's method table all
read this table. A term from outside the package: ``register_loss`` in a file passed with ``--loss-plugin FILE.py``,
or a module named by a ``timm_icd.losses`` entry point (``load_plugins``).
"""
import importlib.util
import logging
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..base import UserError
from .feature_task import TOKEN_TEMPERATURE, FeatureTask, TokenTask
from .gather import BATCHES
from .icd_loss import ICD_NEGATIVES
from .logit_losses import DIST_TEMPERATURE, KD_TEMPERATURE, LS_TEMPERATURE, dist_loss, dkd_loss, kd_loss

_logger = logging.getLogger(__name__)

LOGIT, FEATURE, TIMM = 'logit', 'feature', 'timm'  # what a term reads: logits, features, or it is a timm task
ENTRY_POINTS = 'timm_icd.losses'  # a package's entry point in this group names a module that calls register_loss
NAME = re.compile(r'[a-z][a-z0-9_]*$')


def _p(default, help: str, check: Optional[str] = None, choices: Optional[Sequence] = None):
    """A parameter field: its default, its ``--help`` line, a bound (``'>= 0'``, ``'> 0'``, ``'>= 1'``), choices."""
    return field(default=default, metadata={'help': help, 'check': check, 'choices': choices})


@dataclass(frozen=True)
class NoParams:
    """A term without parameters of its own."""


@dataclass(frozen=True)
class KDParams:
    """Hinton KD's settings, which apply to whichever logit term a method has (KD, DKD, DIST or a registered one)."""
    temperature: Optional[float] = _p(None, "temperature of the logit term, KD, DKD or DIST (default: 4, the authors' "
                                            "CIFAR-100 setting, for KD and DKD; 1 for DIST, chosen on validation by "
                                            "the study, benchmarks/results/study_tuning.md; 2 with --kd-standardize "
                                            "as in Sun et al.)", '> 0')
    standardize: bool = _p(False, 'Z-score both logits per sample before KD (Sun et al., CVPR 2024); sets T to 2 if '
                                  'unset')


@dataclass(frozen=True)
class DKDParams:
    alpha: float = _p(1.0, "DKD: weight of the target-class part TCKD (default: 1, the authors')", '>= 0')
    beta: float = _p(2.0, 'DKD: weight of the non-target part NCKD (default: 2, chosen on validation by the study, '
                     'benchmarks/results/study_tuning.md; the authors use 8 on CIFAR-100, 0.5 on ImageNet)', '>= 0')
    warmup_epochs: int = _p(20, "DKD: its weight ramps up linearly over this many epochs (default: 20, the authors' "
                                "CIFAR-100 setting for 240 epochs; 0: no ramp)", '>= 0')


@dataclass(frozen=True)
class DISTParams:
    beta: float = _p(2.0, "DIST: weight of the inter-class relation (default: 2, the authors' CIFAR-100 setting)",
                     '>= 0')
    gamma: float = _p(2.0, "DIST: weight of the intra-class relation (default: 2, the authors' CIFAR-100 setting)",
                      '>= 0')
    batch: str = _p('local', "DIST's intra-class term over each process's batch (local, default, as the authors' DDP "
                             "code) or over every process's batch together (global: the logits are gathered)",
                    choices=BATCHES)


@dataclass(frozen=True)
class ICDParams:
    feat_dim: int = _p(128, 'ICD embedding width (default: 128)', '>= 1')
    alpha: float = _p(0.5, 'weight of the invariance term (default: 0.5)', '>= 0')
    init_t: float = _p(1.0, 'initial t; tau = exp(t) (default: 1)')
    max_tau: float = _p(10.0, 'clamp of tau (default: 10)', '> 0')
    negatives: str = _p('local', "local: negatives from this process's batch (paper); global: gathered from all",
                        choices=ICD_NEGATIVES)


@dataclass(frozen=True)
class TokenParams:
    distill_type: str = _p('soft', "--method token: soft (default), KL to the teacher's softmax at --kd-temperature "
                                   "(default: 1, timm's), or hard, CE to the teacher's top class",
                           choices=('soft', 'hard'))


@dataclass(frozen=True)
class LossTerm:
    """One loss term, as every layer sees it.

    Attributes:
        name: Its ``--method`` name and the prefix of its flags (``--NAME-FIELD``) and record keys.
        kind: ``LOGIT`` (student and teacher logits), ``FEATURE`` (ICD) or ``TIMM`` (a timm task runs the loss).
        title, short: Its name in words, alone (the card's method line) and beside ICD (``short``).
        loss: For a logit term, ``loss(student_logits, teacher_logits, target, temperature, standardize, params)``,
            a float32 scalar, the batch mean. A term whose params have ``warmup_epochs`` is ramped up linearly over
            them; one whose params have ``batch='global'`` receives every process's logits. For a ``TIMM`` term, the
            task class that runs it (``FeatureTask``, ``TokenTask``).
        params: Its frozen parameters dataclass.
        weights: (CE, this term) when it is the method's only teacher term.
        icd_weights: (CE, this term) beside ICD (for ICD itself: ICD's weight beside a logit term).
        temperature: The default temperature of a logit term (2 with standardised logits, whatever the term).
        hard_labels: Why the term needs class indices, not Mixup/CutMix soft targets (None: it does not).
        same_label_space: Whether the teacher must predict the dataset's classes.
        citation, arxiv: Where it comes from.
        bibtex: Its BibTeX entry, for the model card of a student trained with it.
    """
    name: str
    kind: str
    title: str
    short: str = ''
    loss: Optional[Callable] = None
    params: type = NoParams
    weights: Tuple[float, float] = (1.0, 1.0)
    icd_weights: Tuple[float, float] = (1.0, 1.0)
    temperature: Optional[float] = None
    hard_labels: Optional[str] = None
    same_label_space: bool = True
    citation: str = ''
    arxiv: Optional[str] = None
    bibtex: str = ''


TERMS: Dict[str, LossTerm] = {}
METHOD_WEIGHTS: Dict[str, Tuple[float, float, float]] = {}  # (task, kd, icd) of each method; kept in step by _declare
LOGIT_LOSSES: Dict[str, str] = {}  # method -> its logit term


def _refresh() -> None:
    """Derive the methods from the table, in place (so importers of the dicts see registered terms)."""
    logits = [t for t in TERMS.values() if t.kind == LOGIT]
    icd = TERMS.get('icd')
    weights = {'vanilla': (1.0, 0.0, 0.0), **{t.name: (*t.weights, 0.0) for t in logits}}
    if icd is not None:
        weights['icd'] = (icd.weights[0], 0.0, icd.weights[1])
        weights.update({f'icd+{t.name}': (*t.icd_weights, icd.icd_weights[1]) for t in logits})
    METHOD_WEIGHTS.clear()
    METHOD_WEIGHTS.update({k: tuple(float(w) for w in v) for k, v in weights.items()})
    LOGIT_LOSSES.clear()
    LOGIT_LOSSES.update({m: m.split('+')[-1] for m in METHOD_WEIGHTS if m.split('+')[-1] in TERMS
                         and TERMS[m.split('+')[-1]].kind == LOGIT})


def _declare(term: LossTerm) -> LossTerm:
    if not NAME.match(term.name) or term.name in ('vanilla', 'auto'):
        raise UserError(f"loss term name '{term.name}': use lower-case letters, digits and '_', starting with a "
                        f"letter, and not vanilla or auto.")
    if term.name in TERMS:
        raise UserError(f"loss term '{term.name}' is already registered.")
    if not (isinstance(term.params, type) and is_dataclass(term.params) and term.params.__dataclass_params__.frozen):
        raise UserError(f"loss term '{term.name}': params must be a frozen dataclass (@dataclass(frozen=True)).")
    if any(f.default is MISSING for f in fields(term.params)):
        raise UserError(f"loss term '{term.name}': every field of {term.params.__name__} needs a default.")
    TERMS[term.name] = term
    _refresh()
    return term


def register_loss(
        name: str,
        loss: Callable,
        params: type = NoParams,
        title: Optional[str] = None,
        weights: Tuple[float, float] = (1.0, 1.0),
        icd_weights: Tuple[float, float] = (1.0, 1.0),
        temperature: float = KD_TEMPERATURE,
        hard_labels: Optional[str] = None,
        citation: str = '',
        arxiv: Optional[str] = None,
        bibtex: str = '',
) -> LossTerm:
    """Add a logit term to the table: ``--method NAME`` and ``--method icd+NAME`` then train with it.

    Args:
        name: The method name and flag prefix: each field F of ``params`` becomes ``--NAME-F`` (and the keyword
            ``NAME_F`` of ``ICDDistillationTask``).
        loss: ``loss(student_logits, teacher_logits, target, temperature, standardize, params)`` -> scalar tensor.
        params: A frozen dataclass whose fields all have defaults (``field(metadata={'help': ..., 'check': '>= 0'})``
            gives a flag its help line and a bound).
        title: Its name in words (the model card); default: NAME.
        weights, icd_weights: (CE, term) weights alone and beside ICD.
        temperature: Its default temperature (``--kd-temperature`` overrides it).
        hard_labels: Why it needs class indices (then Mixup/CutMix are refused with it), or None.
        citation, arxiv: Where it comes from, for the method table and the model card.
        bibtex: Its BibTeX entry, for the model card.

    Example (a file passed with ``train_icd.py --loss-plugin my_loss.py --method mse``)::

        from dataclasses import dataclass
        from timm_icd import register_loss

        @dataclass(frozen=True)
        class MSEParams:
            scale: float = 1.0

        register_loss('mse', lambda s, t, y, temperature, standardize, p: p.scale * ((s - t) ** 2).mean(), MSEParams)
    """
    return _declare(LossTerm(name, LOGIT, title or name, title or name, loss, params, tuple(weights),
                             tuple(icd_weights), float(temperature), hard_labels, True, citation, arxiv, bibtex))


def load_plugins(files: Sequence[str] = ()) -> List[str]:
    """Import every ``timm_icd.losses`` entry point and each file of ``files`` once; returns the terms they added.

    A file is imported as a module of its own (its name: the file's stem); it registers its terms with
    ``register_loss``. A file that is missing or raises is one ``UserError`` line.
    """
    before = set(TERMS)
    for ep in entry_points(group=ENTRY_POINTS):
        if ep.value not in _LOADED:
            _LOADED.add(ep.value)
            ep.load()
    for file in files:
        path = Path(file).resolve()
        if str(path) in _LOADED:
            continue
        if not path.is_file() or path.suffix != '.py':
            raise UserError(f'--loss-plugin: no Python file {file}.')
        spec = importlib.util.spec_from_file_location(f'timm_icd_plugin_{path.stem}', path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f'--loss-plugin {file}: {type(e).__name__}: {e}') from e
        _LOADED.add(str(path))
    added = [n for n in TERMS if n not in before]
    if added:
        _logger.info(f"Loss terms registered from plugins: {', '.join(added)}.")
    return added


_LOADED: set = set()


def params_of(term: str, settings: Mapping[str, Any], base: Optional[Any] = None) -> Any:
    """The parameters of ``term`` from ``settings`` keyed ``TERM_FIELD`` (flags' dests, or the task's keywords);
    fields not in ``settings`` keep ``base``'s values, or the defaults."""
    base = base if base is not None else TERMS[term].params()
    given = {f.name: settings[f'{term}_{f.name}'] for f in fields(base) if f'{term}_{f.name}' in settings}
    return replace(base, **given)


def split_settings(settings: Mapping[str, Any], base: Optional[Mapping[str, Any]] = None,
                   owner: str = 'ICDDistillationTask') -> Dict[str, Any]:
    """``base`` (``{term: params}``) updated by keywords ``TERM_FIELD=value`` (``dkd_beta=8``); an unknown keyword is
    a TypeError, as for any function."""
    base = dict(base or {})
    known = {f'{t}_{f.name}': t for t in TERMS for f in fields(TERMS[t].params)}
    unknown = [k for k in settings if k not in known]
    if unknown:
        raise TypeError(f"{owner} got an unexpected keyword argument '{unknown[0]}'")
    for term in {known[k] for k in settings}:
        base[term] = params_of(term, settings, base.get(term))
    return base


def param_problems(term: str, params: Any) -> List[str]:
    """What is wrong with ``params`` of ``term``, one sentence each in flag names (``--dkd-beta must be >= 0``)."""
    problems = []
    for f in fields(params):
        value, meta = getattr(params, f.name), f.metadata
        flag = f"--{term}-{f.name.replace('_', '-')}"
        if meta.get('choices') and value not in meta['choices']:
            problems.append(f"{flag} must be one of {', '.join(meta['choices'])}, got {value!r}.")
        bound = meta.get('check')
        if bound and value is not None:
            op, limit = bound.split()
            if not (value >= float(limit) if op == '>=' else value > float(limit)):
                problems.append(f'{flag} must be {bound}, got {value}.')
    return problems


def default_temperature(logit_loss: Optional[str], standardize: bool = False) -> float:
    """The temperature a logit term gets when none is given: 2 with standardisation, else the term's own.

    Decided from the resolved logit term, so ``--method auto`` gets the temperature of the term it chose.
    """
    if standardize:
        return LS_TEMPERATURE
    term = TERMS.get(logit_loss or 'kd')
    return term.temperature if term is not None and term.temperature is not None else KD_TEMPERATURE


def method_title(method: str) -> str:
    """A method in words, for the model card: ``Invariant Consistency Distillation plus Hinton KD (ICD+KD)``."""
    parts = method.split('+')
    if method == 'vanilla':
        return 'plain cross-entropy training (no distillation)'
    if len(parts) == 2 and parts[0] == 'icd' and parts[1] in TERMS:
        return f"{TERMS['icd'].short} plus {TERMS[parts[1]].short} ({method.upper()})"
    return TERMS[method].title if method in TERMS else method


def record_of(method: str, logit: Optional[str], params: Mapping[str, Any]) -> Dict[str, Any]:
    """The part of distillation.json each logit term writes: ``kd_FIELD`` for the settings every logit term shares,
    ``{NAME: {field: value}}`` for the active term's own parameters, None for every other logit term, and
    ``logit_term``: the active one's title, citation and BibTeX entry (the model card's)."""
    shared = params.get('kd', KDParams()) if logit else None
    out: Dict[str, Any] = {'method': method, 'method_title': method_title(method), 'logit_loss': logit}
    term = TERMS.get(logit) if logit else None  # its words for the model card, which a push without its plugin needs
    out['logit_term'] = {'name': term.name, 'title': term.title, 'citation': cite(term),
                         'bibtex': term.bibtex.strip()} if term else None
    out.update({f'kd_{f.name}': getattr(shared, f.name) if shared else None for f in fields(KDParams)})
    for term in TERMS.values():
        if term.kind == LOGIT and term.name != 'kd':
            out[term.name] = asdict(params.get(term.name, term.params())) if term.name == logit else None
    return out


def cite(term: LossTerm) -> str:
    """The term's citation, linked to its arXiv page where it has one."""
    return f'[{term.citation}](https://arxiv.org/abs/{term.arxiv})' if term.arxiv else term.citation or term.name


def method_table() -> str:
    """The README's method table, in markdown, from the table of terms (tests/test_terms.py holds them equal)."""
    def weight(w: float) -> str:
        return f'{w:g}'
    rows = ['| method | CE | LOGIT | ICD | needs the teacher\'s label space | hard labels | from |',
            '|---|---|---|---|---|---|---|']
    for method, (ce, kd, icd) in METHOD_WEIGHTS.items():
        logit = TERMS.get(LOGIT_LOSSES.get(method, ''))
        parts = [TERMS[p] for p in method.split('+') if p in TERMS]
        space = 'no teacher at all' if method == 'vanilla' else 'yes' if logit and logit.same_label_space else 'no'
        rows.append(f"| {method} | {weight(ce)} | {weight(kd) + ' ' + logit.name.upper() if logit else '0'} | "
                    f"{weight(icd)} | {space} | {'yes' if logit and logit.hard_labels else 'no'} | "
                    f"{'; '.join(cite(t) for t in parts) or '-'} |")
    for term in (t for t in TERMS.values() if t.kind == TIMM):
        rows.append(f"| {term.name} | {weight(term.weights[0])} | {weight(term.weights[1])} {term.short} (timm's "
                    f"task) | 0 | {'yes' if term.same_label_space else 'no'} | no | {cite(term)} |")
    return '\n'.join(rows)


_declare(LossTerm('kd', LOGIT, 'Hinton knowledge distillation (KD)', 'Hinton KD',
                  lambda s, t, y, temperature, standardize, p: kd_loss(s, t, temperature, standardize=standardize),
                  KDParams, (0.1, 0.9), (1.0, 1.0), KD_TEMPERATURE,
                  citation='Hinton et al., 2015', arxiv='1503.02531', bibtex='''
@article{hinton2015distilling,
  title   = {Distilling the Knowledge in a Neural Network},
  author  = {Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff},
  journal = {arXiv preprint arXiv:1503.02531},
  year    = {2015}
}'''))
_declare(LossTerm('dkd', LOGIT, 'Decoupled Knowledge Distillation (DKD)', 'Decoupled KD',
                  lambda s, t, y, temperature, standardize, p: dkd_loss(s, t, y, temperature, p.alpha, p.beta,
                                                                        standardize=standardize),
                  DKDParams, (1.0, 1.0), (1.0, 1.0), KD_TEMPERATURE,
                  hard_labels='separates the target class from the others',
                  citation='Zhao et al., CVPR 2022', arxiv='2203.08679', bibtex='''
@inproceedings{zhao2022dkd,
  title     = {Decoupled Knowledge Distillation},
  author    = {Zhao, Borui and Cui, Quan and Song, Renjie and Qiu, Yiyu and Liang, Jiajun},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022}
}'''))
_declare(LossTerm('dist', LOGIT, 'DIST, distillation of inter- and intra-class relations', 'DIST',
                  lambda s, t, y, temperature, standardize, p: dist_loss(s, t, temperature, p.beta, p.gamma,
                                                                         standardize=standardize),
                  DISTParams, (1.0, 1.0), (1.0, 1.0), DIST_TEMPERATURE,
                  citation='Huang et al., NeurIPS 2022', arxiv='2205.10536', bibtex='''
@inproceedings{huang2022dist,
  title     = {Knowledge Distillation from A Stronger Teacher},
  author    = {Huang, Tao and You, Shan and Wang, Fei and Qian, Chen and Xu, Chang},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2022}
}'''))
_declare(LossTerm('icd', FEATURE, 'Invariant Consistency Distillation (ICD)', 'Invariant Consistency Distillation',
                  None, ICDParams, (1.0, 1.0), (1.0, 1.0), same_label_space=False,
                  citation='Giakoumoglou and Stathaki, 2024', arxiv='2407.11802'))
_declare(LossTerm('feature', TIMM, FeatureTask.title, 'feature MSE', FeatureTask, same_label_space=False,
                  citation='FitNets, Romero et al., ICLR 2015', arxiv='1412.6550'))
_declare(LossTerm('token', TIMM, TokenTask.title, 'distillation-token KD', TokenTask, TokenParams,
                  temperature=TOKEN_TEMPERATURE,
                  citation='DeiT, Touvron et al., ICML 2021', arxiv='2012.12877'))
