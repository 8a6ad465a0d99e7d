"""Data loaders: real data sets read where they are installed, never downloaded or copied.

Sequences (FedDCSR folders, MovieLens genre domains, any RecBole atomic files with a domain
field) become ``DomainSequences``, merged
histories ``Timeline``, multi-scenario click data ``ScenarioData`` and images
``ImageDataset``, so methods never depend on where their data came from.
"""

from p2pmoe.data.aliexpress import read_aliexpress_csv
from p2pmoe.data.atomic import AtomicTable, read_atomic
from p2pmoe.data.crossdomain import CrossDomainInteractions, load_atomic_domains
from p2pmoe.data.errors import DataFormatError, DataNotFoundError
from p2pmoe.data.feddcsr import FKCB_DOMAINS, load_feddcsr, load_feddcsr_domain
from p2pmoe.data.images import IMAGE_DATASETS, ImageDataset, load_image_dataset, read_idx
from p2pmoe.data.movielens import (
    AGE_GROUPS,
    GENRE_DOMAINS,
    MovieLens,
    age_groups,
    find_movielens,
    genre_domains,
    load_movielens,
    multi_scenario_multi_task,
    non_overlapped_domains,
    overlapped_timelines,
)
from p2pmoe.data.multitask import ScenarioData, random_split
from p2pmoe.data.sequences import DomainSequences, Timeline

__all__ = [
    "AGE_GROUPS",
    "FKCB_DOMAINS",
    "GENRE_DOMAINS",
    "IMAGE_DATASETS",
    "AtomicTable",
    "CrossDomainInteractions",
    "DataFormatError",
    "DataNotFoundError",
    "DomainSequences",
    "ImageDataset",
    "MovieLens",
    "ScenarioData",
    "Timeline",
    "age_groups",
    "find_movielens",
    "genre_domains",
    "load_feddcsr",
    "load_feddcsr_domain",
    "load_atomic_domains",
    "load_image_dataset",
    "load_movielens",
    "multi_scenario_multi_task",
    "non_overlapped_domains",
    "overlapped_timelines",
    "random_split",
    "read_aliexpress_csv",
    "read_atomic",
    "read_idx",
]
