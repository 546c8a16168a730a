"""Whether a teacher predicts the dataset's classes: the same classes under other names, in another order, or a
subset of the teacher's, are recognised; the teacher's logits are then re-indexed to the dataset's classes.

Names are compared after folding case and surrounding whitespace, with WordNet synsets (``n01440764``, how timm's
ImageNet configs name classes) read as the descriptions timm's ``ImageNetInfo`` gives them (``tench, Tinca tinca``,
how a ``datasets`` ImageNet names them). A name that matches no whole name or description may match by one of its
comma-separated lemmas (``tench``, ``English springer``), where that lemma picks exactly one teacher class.

A teacher whose weights carry no names but whose class count is one of ImageNet's (1000, 11821, 21841, ...) is read
as that ImageNet subset when its weights are timm's pretrained ones (as timm's own inference script does,
``timm.data.infer_imagenet_subset``). Where names cannot tell, ``--teacher-label-map FILE`` or ``--same-label-space``
say it.
"""
import json
import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Sequence

from timm.data import ImageNetInfo, infer_imagenet_subset

from ..base import UserError

_logger = logging.getLogger(__name__)

_SYNSET = re.compile(r'^n\d{8}$')
SAME, REINDEXED, OTHER, UNKNOWN, ADAPTED = 'same', 'reindexed', 'other', 'unknown', 'adapted'


@dataclass(frozen=True)
class LabelSpace:
    """How the teacher's classes relate to the dataset's.

    Attributes:
        kind: 'same' (the dataset's classes in its order), 'reindexed' (the dataset's classes among the teacher's, in
            another order or as a subset: ``index`` says where), 'other' (not the dataset's classes), 'unknown' (no
            names to compare, and the class counts differ) or 'adapted' (other classes, but the tool fitted the teacher
            a head for the dataset's: ``--teacher-adapt``).
        index: For 'reindexed', the teacher's output for each of the dataset's classes (``logits[:, index]``).
        why: One sentence for the log.
    """
    kind: str
    index: Optional[List[int]]
    why: str

    @property
    def predicts_dataset(self) -> bool:
        """The teacher predicts the dataset's classes, possibly after ``index`` re-indexes its logits."""
        return self.kind in (SAME, REINDEXED, ADAPTED)

    @property
    def in_dataset_order(self) -> bool:
        """The teacher's logits are the dataset's classes in its order, as they are or through an adapted head: a
        logit term can use them."""
        return self.kind in (SAME, ADAPTED)


@lru_cache(maxsize=None)
def _synset_descriptions() -> Dict[str, str]:
    table = {}
    for subset in ('imagenet-22k', 'imagenet-1k'):  # 22k holds 12k's synsets and all but one of 1k's (n04399382)
        info = ImageNetInfo(subset)
        table.update({name: info.label_name_to_description(name) for name in info.label_names()})
    return table


def _fold(name: str) -> str:
    return ' '.join(str(name).split()).casefold()


def canonical_name(name: str) -> str:
    """A class name folded for comparison: case and whitespace folded, a WordNet synset read as its description."""
    name = str(name).strip()
    if _SYNSET.match(name):
        name = _synset_descriptions().get(name, name)
    return _fold(name)


def _lemmas(canonical: str) -> List[str]:
    return [part.strip() for part in canonical.split(',') if part.strip()]


def imagenet_label_names(num_classes: int) -> Optional[List[str]]:
    """The synsets of the ImageNet subset with ``num_classes`` classes (timm's table), or None."""
    subset = infer_imagenet_subset({'num_classes': num_classes})
    return list(ImageNetInfo(subset).label_names()) if subset else None


def _match(theirs: Sequence[str], ours: Sequence[str]) -> Optional[List[int]]:
    """For each of ``ours``, the one class of ``theirs`` with the same canonical name (a name both repeat: the k-th of
    ours is the k-th of theirs), else the one sharing a lemma; None when some class of ours has no such one or two of
    ours pick the same class."""
    canon = [canonical_name(n) for n in theirs]
    by_name: Dict[str, List[int]] = {}
    by_lemma: Dict[str, List[int]] = {}
    for i, name in enumerate(canon):
        by_name.setdefault(name, []).append(i)
        for lemma in _lemmas(name):
            by_lemma.setdefault(lemma, []).append(i)
    index, seen = [], {}
    ours = [canonical_name(n) for n in ours]
    for name in ours:
        found, k = by_name.get(name, []), seen.get(name, 0)
        seen[name] = k + 1
        if 1 < len(found) == ours.count(name):  # a name both sides repeat (ImageNet's two cranes): in order
            found = [found[k]]
        if len(found) != 1:
            found = sorted({i for lemma in _lemmas(name) for i in by_lemma.get(lemma, []) if len(by_lemma[lemma]) == 1})
        if len(found) != 1:
            return None
        index.append(found[0])
    return index if len(set(index)) == len(index) else None


def _preview(names: Sequence[str]) -> str:
    return ', '.join(str(n) for n in list(names)[:3]) + (', ...' if len(names) > 3 else '')


def match_label_space(
        teacher_classes: int,
        num_classes: int,
        teacher_label_names: Optional[Sequence[str]] = None,
        label_names: Optional[Sequence[str]] = None,
        label_map: Optional[Sequence[int]] = None,
        same_label_space: bool = False,
) -> LabelSpace:
    """Decide whether a teacher with ``teacher_classes`` outputs predicts a dataset's ``num_classes`` classes.

    Args:
        teacher_classes, num_classes: Outputs of the teacher; classes of the dataset.
        teacher_label_names, label_names: Their class names, where known.
        label_map: The teacher's output for each dataset class (``read_label_map``), given by the user: it decides.
        same_label_space: The user says the teacher's classes are the dataset's, in its order.
    """
    if label_map is not None:
        index = [int(i) for i in label_map]
        if len(index) != num_classes or not all(0 <= i < teacher_classes for i in index) or \
                len(set(index)) != len(index):
            raise UserError(f'--teacher-label-map must give {num_classes} distinct teacher outputs (0 to '
                            f'{teacher_classes - 1}), one per dataset class; it gives {len(index)}.')
        if index == list(range(teacher_classes)):
            return LabelSpace(SAME, None, '--teacher-label-map maps every class to itself')
        return LabelSpace(REINDEXED, index, f'--teacher-label-map maps the {num_classes} classes to teacher outputs '
                                            f'{_preview(index)}')
    if same_label_space:
        if teacher_classes != num_classes:
            raise UserError(f'--same-label-space: the teacher predicts {teacher_classes} classes but the dataset has '
                            f'{num_classes}; give --teacher-label-map FILE to say which output is which class.')
        return LabelSpace(SAME, None, '--same-label-space says so')
    theirs = [str(n) for n in teacher_label_names] if teacher_label_names else None
    ours = [str(n) for n in label_names] if label_names else None
    if theirs is None or ours is None or len(theirs) != teacher_classes:
        if teacher_classes == num_classes:
            return LabelSpace(SAME, None, f'the teacher predicts {num_classes} classes, as many as the dataset has '
                                          f'(no names to compare)')
        return LabelSpace(UNKNOWN, None, f'the teacher predicts {teacher_classes} classes, the dataset has '
                                         f'{num_classes}')
    if theirs == ours:
        return LabelSpace(SAME, None, f"the teacher's {num_classes} class names are the dataset's")
    index = _match(theirs, ours)
    if index is None:
        return LabelSpace(OTHER, None, f"the teacher's classes ({_preview(theirs)}) are not the dataset's "
                                       f"({_preview(ours)})")
    if index == list(range(teacher_classes)):
        return LabelSpace(SAME, None, f"the teacher's {num_classes} classes are the dataset's under other names "
                                      f"({theirs[0]} is {ours[0]})")
    what = 'in another order' if num_classes == teacher_classes else \
        f'among its {teacher_classes}'
    return LabelSpace(REINDEXED, index, f"the dataset's {num_classes} classes are the teacher's {what}: its logits "
                                        f"are re-indexed ({ours[0]} is teacher output {index[0]})")


def read_label_map(path: str, label_names: Optional[Sequence[str]],
                   teacher_label_names: Optional[Sequence[str]]) -> List[int]:
    """Read ``--teacher-label-map FILE``: JSON, either a list (entry i: the teacher output, an index or a teacher
    class name, for dataset class i) or an object mapping dataset class names (or indices) to teacher outputs."""
    if not os.path.isfile(path):
        raise UserError(f'--teacher-label-map: no file {path}.')
    try:
        with open(path) as f:
            spec = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f'--teacher-label-map {path} is not valid JSON ({" ".join(str(e).split())[:120]}).') from e
    ours = [str(n) for n in label_names or []]
    theirs = {str(n): i for i, n in enumerate(teacher_label_names or [])}

    def output(value) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value in theirs:
            return theirs[value]
        raise UserError(f'--teacher-label-map {path}: {value!r} is neither a teacher output index nor one of the '
                        f"teacher's class names.")

    if isinstance(spec, list):
        return [output(v) for v in spec]
    if isinstance(spec, dict):
        def row(key: str) -> int:
            if key in ours:
                return ours.index(key)
            if key.isdigit():
                return int(key)
            raise UserError(f"--teacher-label-map {path}: {key!r} is not one of the dataset's classes.")
        rows = {row(k): output(v) for k, v in spec.items()}
        missing = [ours[i] if i < len(ours) else str(i) for i in range(len(ours) or len(rows)) if i not in rows]
        if missing:
            raise UserError(f'--teacher-label-map {path} maps no teacher output for dataset class {missing[0]}.')
        return [rows[i] for i in range(len(rows))]
    raise UserError(f'--teacher-label-map {path} must hold a JSON list or object, not {type(spec).__name__}.')
